"""The Prometheus alert rules and the Grafana dashboard in ``deploy/``, checked as users run
them: ``promtool`` checks the rules and runs their unit tests (``pollen-alerts.test.yml``),
then Debian's real Prometheus scrapes a real Pollen (collector, enabler, API) watching a real
worker, loads the rules, and every dashboard query is evaluated against it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.support.api import Api
from tests.support.prometheus import PROMTOOL, Prometheus, require
from tests.support.servers import (
    ROOT,
    Process,
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)

RULES = ROOT / "deploy" / "prometheus" / "pollen-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "pollen-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pollen-dashboard.json"
SCRAPE = 0.5  # seconds
WORKER = "prom@pollen-test"
BACKLOG = "backlog"  # a queue nobody consumes: its oldest message has an age
#: Targets that have nothing to show on this stack, and why (each still evaluated).
EMPTY_HERE = {
    "Consumers per queue (RabbitMQ)": "a Redis broker cannot count consumers",
    "Tasks lost (on workers that died)": "no worker dies here (tests/enabler covers lost tasks)",
}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    require(PROMTOOL)
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert of the file has a unit test
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    tested_names = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts == tested_names


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def test_dashboard_is_well_formed() -> None:
    doc = dashboard()
    names = {v["name"] for v in doc["templating"]["list"]}
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= names, (panel["title"], used - names)


def grafana_expr(expr: str, rate_window: str) -> str:
    """``expr`` as Grafana sends it with every variable at All and job ``pollen``."""
    out = expr.replace("$__rate_interval", rate_window).replace('"$job"', '"pollen"')
    return re.sub(r'"\$(task|queue|worker)"', '".*"', out)


class Stack:
    def __init__(self, api: Api, prometheus: Prometheus) -> None:
        self.api, self.prometheus = api, prometheus


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require()
    workdir = tmp_path_factory.mktemp("prometheus-rules")
    server = RedisServer(workdir / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    env = pollen_env(
        broker,
        f"redis://127.0.0.1:{server.port}/1",
        "prom",
        queue_interval="0.5",
        queues=f"celery,{BACKLOG}",
    )
    procs: list[Process] = []
    api: Api | None = None
    prometheus: Prometheus | None = None
    app = Celery(broker=broker)
    app.conf.task_send_sent_event = True
    try:
        procs.append(service("collector", env, workdir / "collector.log"))
        procs.append(service("enabler", env, workdir / "enabler.log"))
        procs.append(celery_worker(broker, workdir / "worker.log", WORKER))
        api = Api(env, workdir / "api.log")
        prometheus = Prometheus(workdir, {"pollen": api.port}, SCRAPE, (RULES,))
        wait_for(lambda: api.data("/api/workers").get(WORKER), timeout=60, message="worker up")
        app.send_task("demo.app.add", (0, 0), queue=BACKLOG)
        ids = [app.send_task("demo.app.add", (i, i)).id for i in range(5)]
        ids += [app.send_task("demo.app.slow", (0.2,)).id for _ in range(3)]
        ids += [app.send_task("demo.app.fail_as", ("KeyError", "k")).id for _ in range(2)]
        ids += [app.send_task("demo.app.flaky").id]

        def finished() -> bool:
            tasks = api.data("/api/tasks?limit=100")
            return all(tasks.get(u, {}).get("state") in ("SUCCESS", "FAILURE") for u in ids)

        wait_for(finished, timeout=60, message="every task finished")

        def backlog_aged() -> bool:
            queues = {q["name"]: q for q in api.data("/api/queues/length")["active_queues"]}
            return bool((queues.get(BACKLOG, {}).get("oldest") or {}).get("age") is not None)

        wait_for(backlog_aged, timeout=30, message="the backlog's oldest message aged")
        done = time.time()
        # scraped after the tasks finished, and long enough before now for rate windows
        wait_for(
            lambda: prometheus.settled_since(done + 4 * SCRAPE),
            timeout=60,
            interval=SCRAPE,
            message="prometheus scraping the settled state",
        )
        yield Stack(api, prometheus)
    finally:
        app.close()
        if prometheus is not None:
            prometheus.stop()
        if api is not None:
            api.stop()
        for p in procs:
            p.stop()
        server.stop()


def test_every_dashboard_query_reads_pollen(stack: Stack) -> None:
    now = time.time()
    doc = dashboard()
    for variable in doc["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric, label = re.fullmatch(
            r"label_values\(([^,]+), (\w+)\)", variable["query"]["query"]
        ).groups()  # type: ignore[union-attr]
        values = stack.prometheus.api(
            f"label/{label}/values", **{"match[]": grafana_expr(metric, "30s")}
        )
        assert values, variable["name"]
    for panel in doc["panels"]:
        found = False
        for target in panel["targets"]:
            # a rate window of several scrapes, as Grafana's $__rate_interval is
            result = stack.prometheus.query(grafana_expr(target["expr"], "5s"), now)
            found = found or bool(result)
        if panel["title"] in EMPTY_HERE:
            assert not found, f"{panel['title']} has data now: drop it from EMPTY_HERE"
        else:
            assert found, f"{panel['title']}: no data ({panel['targets']})"


def test_rules_evaluate_on_pollen(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = stack.prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        # before its first evaluation a rule's time is the zero time, year 1
        done = all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules)
        return rules if rules and done else None

    rules = wait_for(evaluated, timeout=30, message="every rule evaluated")
    assert isinstance(rules, list)
    assert len(rules) == len(re.findall(r"^\s+- alert: ", RULES.read_text(), re.M))
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # the classes this stack's tasks failed with are new (no failures an hour ago)
    firing = {
        (a["labels"]["alertname"], a["labels"].get("exception"))
        for a in stack.prometheus.api("alerts")["alerts"]
    }
    assert ("CeleryNewExceptionClass", "KeyError") in firing
    assert ("CeleryNewExceptionClass", "RuntimeError") in firing
    assert not {name for name, _ in firing} & {"CeleryWorkerDown", "PollenCollectorDown"}
