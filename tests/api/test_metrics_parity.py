"""``/metrics`` as Flower's, checked the way users consume it: Debian's ``prometheus`` scrapes a
real ``celery flower`` and Pollen fed the same real events (two real ``celery worker``
processes running the demo tasks over one private Redis broker), and every query of Flower's
example Grafana dashboard (``examples/celery-monitoring-grafana-dashboard.json`` in Flower's
repository, copied below with its panel titles) is evaluated on both: same series, same values.

Values read through ``increase()``/``rate()`` are Prometheus's extrapolation from each
target's own scrape times, which differ between the two targets by up to a scrape interval:
those are compared within ``RATE_TOLERANCE``; gauges and counts exactly. Documented
divergences (docs/api.md, "Metrics"): the prefetch time of a worker and task name is the
latest event's by sender time in Pollen, the latest to arrive in Flower (``SERIES_ONLY``); a
crashed worker goes offline in Pollen and stays online in Flower (no worker dies here).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.test_flower_process import Flower
from tests.support.api import Api
from tests.support.cluster import client, stop_all, wait_worker_up
from tests.support.prometheus import Prometheus, require
from tests.support.servers import (
    Process,
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)

SCRAPE = 0.5  # seconds
#: Relative difference allowed where Prometheus extrapolates (increase, rate), plus one.
RATE_TOLERANCE = 0.15
WORKERS = ("alpha@parity", "beta@parity")

#: Flower's example dashboard: (panel, PromQL), $worker and $task being "All".
DASHBOARD = [
    ("Online Workers", 'count(flower_worker_online{worker=~"$worker"} == 1) or vector(0)'),
    ("Offline Workers", 'count(flower_worker_online{worker=~"$worker"} == 0) or vector(0)'),
    (
        "Processed Tasks",
        'sum(increase(flower_events_total{worker=~"$worker", task=~"$task", '
        'type=~"task-(succeeded|failed)"}[$__range])) or vector(0)',
    ),
    (
        "Failed Tasks",
        'sum(increase(flower_events_total{worker=~"$worker", task=~"$task", '
        'type="task-failed"}[$__range])) or vector(0)',
    ),
    ("Active Tasks", 'flower_worker_number_of_currently_executing_tasks{worker=~"$worker"}'),
    (
        "Processed Tasks by worker",
        'sum by (worker) (increase(flower_events_total{worker=~"$worker", task=~"$task", '
        'type=~"task-(succeeded|failed)"}[$__rate_interval]))',
    ),
    (
        "Failed Tasks by worker",
        'sum by (worker) (increase(flower_events_total{worker=~"$worker", task=~"$task", '
        'type="task-failed"}[$__rate_interval]))',
    ),
    (
        "Retried Tasks",
        'sum by (worker) (increase(flower_events_total{worker=~"$worker", task=~"$task", '
        'type="task-retried"}[$__rate_interval]))',
    ),
    (
        "Prefetched Tasks",
        'sum by (worker) (flower_worker_prefetched_tasks{worker=~"$worker", task=~"$task"})',
    ),
    (
        "Prefetch Time",
        'avg by (task) (flower_task_prefetch_time_seconds{worker=~"$worker", task=~"$task"})',
    ),
    (
        "Task Runtime",
        'sum by (task) (rate(flower_task_runtime_seconds_sum{worker=~"$worker", '
        'task=~"$task"}[$__rate_interval])) / clamp_min(sum by (task) '
        '(rate(flower_task_runtime_seconds_count{worker=~"$worker", '
        'task=~"$task"}[$__rate_interval])), 0.000000001)',
    ),
    (
        "P95 Task Runtime",
        "histogram_quantile(0.95, sum by (le, task) (rate(flower_task_runtime_seconds_bucket"
        '{worker=~"$worker", task=~"$task"}[$__rate_interval])))',
    ),
]


#: Panels whose series are compared but not their values, with the reason.
SERIES_ONLY = {
    # each (worker, task) holds the value of one task's latest event: the latest to arrive in
    # Flower, the latest by sender time in Pollen (the same whatever order events arrive in);
    # two tasks started within a millisecond on two threads give either answer
    "Prefetch Time": "latest by sender time, not by arrival",
    # Flower's gauge never comes back down for some retried tasks: the retry's task-sent
    # (from another connection, carrying the new eta) can reach it before the task-started of
    # the attempt that retries, whose decrement it then skips (an eta task is not counted);
    # Pollen counts the tasks received and not started. Compared without retries below.
    "Prefetched Tasks": "Flower drifts upward with retries",
}
#: Extra queries, compared exactly: the panels above on what they are exact for.
EXACT = [
    (
        "Prefetched Tasks without retries",
        'sum by (worker) (flower_worker_prefetched_tasks{worker=~"$worker", '
        'task!="demo.app.flaky"})',
    ),
]


def for_job(query: str, job: str, window: float, rate_window: float) -> str:
    """``query`` on one scrape job, with Grafana's variables as the dashboard sets them."""
    out = query.replace('"$worker"', '".*"').replace('"$task"', '".*"')
    out = out.replace("$__range", f"{window:.0f}s")
    return_window = f"{rate_window:.0f}s"
    out = out.replace("$__rate_interval", return_window)
    return re.sub(r"\b(flower_[a-z_]+)\{", rf'\1{{job="{job}", ', out)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, Flower, Api, Prometheus]]:
    require()
    server = RedisServer(tmp_path / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    env = pollen_env(broker, f"redis://127.0.0.1:{server.port}/1", "parity")
    processes: list[Process | None] = []
    flower: Flower | None = None
    api: Api | None = None
    prometheus: Prometheus | None = None
    try:
        processes.append(service("collector", env, tmp_path / "collector.log"))
        api = Api(env, tmp_path / "api.log")
        flower = Flower(broker, tmp_path / "flower.log")
        prometheus = Prometheus(tmp_path, {"flower": flower.port, "pollen": api.port}, SCRAPE)
        for name in WORKERS:
            processes.append(celery_worker(broker, tmp_path / f"{name}.log", name, pool="threads"))
        for name in WORKERS:
            wait_worker_up(broker, name)
        yield broker, flower, api, prometheus
    finally:
        if prometheus is not None:
            prometheus.process.stop()
        if flower is not None:
            flower.process.stop()
        if api is not None:
            api.stop()
        stop_all(*processes)
        server.stop()


def task_events(text: str) -> dict[tuple[str, str, str], float]:
    """``flower_events_total`` samples of a /metrics text: (worker, type, task) -> count
    (labels in any order: prometheus_client sorts them, Pollen writes Flower's order)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"flower_events_total\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
            out[(labels["worker"], labels["type"], labels["task"])] = float(m[2])
    return out


def run_tasks(broker: str, flower: Flower, api: Api) -> None:
    """A round of demo tasks (successes, failures, retries, a countdown) on both workers, until
    Flower and Pollen count the same events."""

    def finished(events: dict[tuple[str, str, str], float]) -> float:
        return sum(v for (_, t, _), v in events.items() if t in ("task-succeeded", "task-failed"))

    before = finished(task_events(api.get("/metrics")[2].decode()))
    app = client(broker)
    try:
        results = [app.send_task("demo.app.add", (i, i)) for i in range(12)]
        results += [app.send_task("demo.app.fail", ("parity",)) for _ in range(3)]
        results += [app.send_task("demo.app.flaky", (1,)) for _ in range(2)]
        results += [app.send_task("demo.app.slow", (0.3,)) for _ in range(2)]
        results.append(app.send_task("demo.app.add", (1, 2), countdown=0.5))
    finally:
        app.close()

    def same_and_done() -> bool:
        theirs = task_events(flower.get("/metrics")[1].decode())
        ours = task_events(api.get("/metrics")[2].decode())
        return theirs == ours and finished(ours) - before >= len(results)

    wait_for(same_and_done, timeout=90, interval=0.5, message="Flower and Pollen agreeing")


def close(a: float, b: float, exact: bool) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if exact:
        return a == pytest.approx(b, abs=1e-6)
    return abs(a - b) <= 1 + RATE_TOLERANCE * max(abs(a), abs(b))


def test_flowers_grafana_dashboard_reads_the_same_on_pollen(
    cluster: tuple[str, Flower, Api, Prometheus],
) -> None:
    broker, flower, api, prometheus = cluster
    started = time.time()
    run_tasks(broker, flower, api)
    run_tasks(broker, flower, api)
    settled = time.time()
    at = wait_for(
        lambda: prometheus.settled_since(settled + 3 * SCRAPE),
        timeout=30,
        interval=SCRAPE,
        message="prometheus scraping the settled state",
    )
    assert isinstance(at, float)
    window = at - started + 10
    rate_window = max(5.0, at - started + 2)
    compared = 0
    for panel, query in [*DASHBOARD, *EXACT]:
        exact = "increase(" not in query and "rate(" not in query
        theirs = prometheus.query(for_job(query, "flower", window, rate_window), at)
        ours = prometheus.query(for_job(query, "pollen", window, rate_window), at)
        assert set(ours) == set(theirs), (panel, theirs, ours)
        if panel in SERIES_ONLY:
            continue
        for labels, value in theirs.items():
            assert close(ours[labels], value, exact), (panel, labels, value, ours[labels])
        compared += len(theirs)
    assert compared > len(DASHBOARD)  # the queries selected series, not only vector(0)
