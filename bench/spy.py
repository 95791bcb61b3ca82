"""Sampling profiles of the real service processes with py-spy, summarised as text.

- collector: one ``python -m services.collector`` draining a backlog from its RabbitMQ queue;
- api: one ``python -m services.api`` answering ``/api/tasks?limit=100`` in a loop.

Each writes ``bench/out/profile_<name>.txt``: the share of samples per function, by self time
and inclusive time (py-spy ``--format raw`` collapsed stacks).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from bench import micro
from bench.generator import GenConfig, generate
from bench.systems import ROOT, Pollen, api_process, broker, scratch

OUT = ROOT / "bench" / "out"


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def record(pid: int, seconds: float, raw: Path, gil: bool = False) -> subprocess.Popen[bytes]:
    """py-spy on ``pid``; with ``gil``, only the thread holding the GIL is sampled (the
    collector has a writer thread: without it, a thread waiting for the GIL looks busy)."""
    exe = py_spy()
    assert exe is not None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            *(["--gil"] if gil else []),
            "-o",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarise(raw: Path, title: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per frame ("function (file:line)")."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return {
        "title": title,
        "samples": total,
        "self": [(f, c / total) for f, c in own.most_common(top)] if total else [],
        "inclusive": [(f, c / total) for f, c in inclusive.most_common(top)] if total else [],
    }


def _short(frame: str) -> str:
    # "func (/long/path/site-packages/pkg/mod.py:12)" -> "func (pkg/mod.py:12)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def write_text(summary: dict[str, Any], path: Path) -> None:
    lines = [f"{summary['title']} - {summary['samples']} samples (py-spy, 200 Hz)", ""]
    for kind in ("self", "inclusive"):
        lines.append(f"-- by {kind} time")
        lines += [f"{share * 100:5.1f}%  {frame}" for frame, share in summary[kind]]
        lines.append("")
    path.write_text("\n".join(lines))


def collector_profile(tasks: int, batched: bool, workdir: Path) -> dict[str, Any]:
    """py-spy on one collector draining a backlog of ``tasks`` tasks."""
    with broker("rabbitmq", workdir) as b:
        pollen = Pollen(b.url, workdir / "pollen", 1)
        try:
            b.wait_consumers(1)
            pollen.stop_collectors()
            gen = generate(GenConfig(broker=b.url, tasks=tasks, batched=batched, tag="spy"))
            pollen.start_collectors()
            time.sleep(1.5)  # imports and connection, not profiled
            raw = workdir / "collector.raw"
            spy = record(pollen.pids()[0], 15, raw, gil=True)
            spy.wait(60)
            counted = pollen.counted().task_events
        finally:
            pollen.stop()
    mode = "batched" if batched else "unbatched"
    summary = summarise(raw, f"collector draining a backlog ({mode} bodies; GIL holder only)")
    summary["events"] = gen.task_events
    summary["counted_at_end"] = counted
    write_text(summary, OUT / f"profile_collector_{mode}.txt")
    return summary


def api_profile(tasks: int, path: str, workdir: Path) -> dict[str, Any]:
    """py-spy on one API process answering ``path`` in a loop, Redis filled with ``tasks``."""
    from tests.support.servers import RedisServer

    server = RedisServer(workdir / "redis-api").start()
    try:
        micro.run(tasks, True, workdir, server=server)
        env = {
            "POLLEN_REDIS_URL": server.url,
            "POLLEN_NAMESPACE": micro.NAMESPACE,
            "POLLEN_LOG_LEVEL": "WARNING",
        }
        proc, base = api_process(env, workdir, 9)
        try:
            raw = workdir / "api.raw"
            spy = record(proc.pid, 10, raw)
            started = time.monotonic()
            requests = 0
            while time.monotonic() - started < 10:
                with urllib.request.urlopen(base + path, timeout=60) as resp:
                    resp.read()
                requests += 1
            spy.wait(60)
        finally:
            proc.stop()
    finally:
        server.stop()
    summary = summarise(raw, f"api answering {path} at {tasks:,} tasks")
    summary["requests"] = requests
    write_text(summary, OUT / "profile_api.txt")
    return summary


def run(tasks: int) -> dict[str, Any]:
    if py_spy() is None:
        return {"skipped": "py-spy is not installed (make bench installs it)"}
    OUT.mkdir(parents=True, exist_ok=True)
    with scratch() as wd:
        return {
            "collector_batched": collector_profile(tasks, True, wd / "c1"),
            "collector_unbatched": collector_profile(tasks, False, wd / "c2"),
            "api": api_profile(tasks, "/api/tasks?limit=100", wd / "a"),
        }
