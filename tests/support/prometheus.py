"""Debian's real ``prometheus`` scraping the test's processes, for the tests that check what
users read through it (Flower's dashboard queries, Pollen's shipped rules and dashboard)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import Process, free_port, wait_for

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def require(binary: str = PROMETHEUS) -> None:
    """Fail (not skip) where Debian's package is missing: .ci/services installs it."""
    if not shutil.which(binary):
        pytest.fail(f"{binary} is not installed: run .ci/services (Debian's prometheus)")


class Prometheus:
    """Prometheus scraping ``jobs`` (name -> port on 127.0.0.1) every ``scrape`` seconds, its
    rules (``rule_files``) evaluated as often."""

    def __init__(
        self,
        workdir: Path,
        jobs: dict[str, int],
        scrape: float,
        rule_files: tuple[Path, ...] = (),
    ) -> None:
        require()
        self.port = free_port()
        self.jobs = jobs
        config = workdir / "prometheus.yml"
        # Prometheus durations are integers with a unit
        every = f"{scrape * 1000:.0f}ms"
        settings = {
            "global": {
                "scrape_interval": every,
                "scrape_timeout": every,
                "evaluation_interval": every,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in jobs.items()
            ],
        }
        config.write_text(json.dumps(settings))  # YAML is a superset of JSON
        self.process = Process(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            workdir / "prometheus.log",
            {},
            cwd=workdir,
        )
        wait_for(self._up, timeout=60, interval=0.2, message="prometheus scraping every job")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def _up(self) -> bool:
        if not self.process.alive():
            raise RuntimeError(f"prometheus exited:\n{self.process.output()[-3000:]}")
        try:
            targets = self.api("targets")["activeTargets"]
        except OSError:
            return False
        return len(targets) == len(self.jobs) and all(t["health"] == "up" for t in targets)

    def settled_since(self, moment: float) -> float | None:
        """A time at which every target's newest sample was taken after ``moment`` by scrapes
        that all succeeded since then; None while there is none."""
        now = time.time()
        span = f"{max(1, round(now - moment))}s"
        found = self.api("query", query=f"min_over_time(up[{span}])", time=repr(now))["result"]
        taken = self.api("query", query="timestamp(up)", time=repr(now))["result"]
        n = len(self.jobs)
        if len(found) != n or any(float(r["value"][1]) != 1 for r in found):
            return None
        if len(taken) != n or not all(float(r["value"][1]) > moment for r in taken):
            return None
        return now

    def query(self, expr: str, at: float) -> dict[tuple[tuple[str, str], ...], float]:
        """``expr`` at ``at``: value per label set (without ``job`` and ``instance``)."""
        result = self.api("query", query=expr, time=repr(at))["result"]
        return {
            tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("job", "instance"))):
            float(r["value"][1])
            for r in result
        }  # fmt: skip

    def stop(self) -> None:
        self.process.stop()
