"""Queue health end to end: a real worker consumes two queues and runs plain, slow, ETA and
retried tasks; the real collector keeps the wait histograms, the real enabler samples the
oldest waiting message of a queue nobody consumes; the API serves them (``/api/stats/wait``,
``/metrics``, ``/api/queues/length``). Every event the broker carried is recorded beside
Pollen, and the waits they give (``tests.support.waits``) are what the API must answer."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish

from tests.api.test_end_to_end import FlowerRecorder
from tests.support.api import Api
from tests.support.servers import (
    Process,
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)
from tests.support.waits import bucket_counts, expected_waits

WORKER = "qh@pollen-test"
#: a queue nobody consumes, and one whose messages carry a timestamp property
BACKLOG, STAMPED = "backlog", "stamped"
STAMP = 1_700_000_000


class Recorder(FlowerRecorder):
    """Flower's EventsState, plus every event as it came."""

    def __init__(self, broker_url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.events_lock = threading.Lock()
        super().__init__(broker_url)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.events_lock:
            self.events.append(dict(event))
        super()._on_event(event)

    def recorded(self) -> list[dict[str, Any]]:
        with self.events_lock:
            return list(self.events)


class Run:
    def __init__(self, api: Api, recorder: Recorder, backlog: list[str]) -> None:
        self.api, self.recorder, self.backlog = api, recorder, backlog


def _stamp(properties: dict[str, Any] | None = None, **_: Any) -> None:
    # what docs/api.md shows users: give every message a timestamp property
    if properties is not None:
        properties["timestamp"] = STAMP


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("queue-health")
    server = RedisServer(workdir / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    env = pollen_env(
        broker,
        f"redis://127.0.0.1:{server.port}/1",
        "qh",
        queue_interval="0.5",
        queues=f"celery,reports,{BACKLOG},{STAMPED}",
    )
    recorder = Recorder(broker)
    procs: list[Process] = []
    api: Api | None = None
    app = Celery(broker=broker)
    app.conf.task_send_sent_event = True
    try:
        procs.append(service("collector", env, workdir / "collector.log"))
        procs.append(service("enabler", env, workdir / "enabler.log"))
        procs.append(celery_worker(broker, workdir / "worker.log", WORKER, "-Q", "celery,reports"))
        api = Api(env, workdir / "api.log")
        wait_for(lambda: api.data("/api/workers").get(WORKER), timeout=60, message="worker up")
        backlog = [app.send_task("demo.app.add", (0, i), queue=BACKLOG).id for i in range(3)]
        before_task_publish.connect(_stamp)
        try:
            app.send_task("demo.app.add", (1, 1), queue=STAMPED)
        finally:
            before_task_publish.disconnect(_stamp)
        ids = [app.send_task("demo.app.add", (i, i)).id for i in range(4)]
        ids += [app.send_task("demo.app.mul", (i, 2), queue="reports").id for i in range(4)]
        # more slow tasks than the pool runs at once: some wait in the worker's prefetch
        ids += [app.send_task("demo.app.slow", (0.3,), queue="reports").id for _ in range(6)]
        ids += [app.send_task("demo.app.add", (5, 5), countdown=1.5).id for _ in range(2)]
        ids += [app.send_task("demo.app.flaky").id for _ in range(2)]

        def finished() -> bool:
            tasks = api.data("/api/tasks?limit=1000")
            return all(tasks.get(u, {}).get("state") == "SUCCESS" for u in ids)

        wait_for(finished, timeout=90, message="every task finished")

        # the recorder has seen every task finish, and Pollen has applied as many waits
        def caught_up() -> bool:
            states = {u: t["state"] for u, t in recorder.tasks()}
            if any(states.get(u) != "SUCCESS" for u in ids):
                return False
            waits = expected_waits(recorder.recorded())
            got = api.data("/api/stats/wait")["waits"]
            return bool(sum(map(len, waits.values())) == sum(w["count"] for w in got))

        wait_for(caught_up, timeout=30, message="the waits of every recorded event")
        yield Run(api, recorder, backlog)
    finally:
        app.close()
        recorder.close()
        if api is not None:
            api.stop()
        for p in procs:
            p.stop()
        server.stop()


def test_waits_are_what_the_events_give(run: Run) -> None:
    expected = expected_waits(run.recorder.recorded())
    # the plan's shape: both queues, both stages, the retries' attempts, ETA tasks
    assert {k for k in expected if k[0] == "queue"} >= {
        ("queue", "celery", "demo.app.add"),
        ("queue", "reports", "demo.app.slow"),
        ("queue", "celery", "demo.app.flaky"),
    }
    assert len(expected[("prefetch", "celery", "demo.app.flaky")]) == 6  # 3 attempts each
    got = {(w["stage"], w["queue"], w["task"]): w for w in run.api.data("/api/stats/wait")["waits"]}
    assert set(got) == set(expected)
    for key, seconds in expected.items():
        w = got[key]
        assert w["counts"] == bucket_counts(seconds), key
        assert w["count"] == len(seconds)
        assert math.isclose(w["sum"], sum(seconds), abs_tol=1e-6), key
        assert w["p50"] is not None and w["p50"] <= w["p90"] <= w["p95"] <= w["p99"]
    # an ETA task waits from its eta: its prefetch wait is far below its countdown, while its
    # received-to-started time holds the countdown
    eta_tasks = [
        t for _, t in run.recorder.tasks() if t["name"] == "demo.app.add" and t["eta"] is not None
    ]
    assert len(eta_tasks) == 2
    assert all(t["started"] - t["received"] >= 1.4 for t in eta_tasks)


def test_window_and_filters(run: Run) -> None:
    everything = run.api.data("/api/stats/wait")["waits"]
    window = run.api.data("/api/stats/wait?minutes=60&compare=1")
    assert [w["counts"] for w in window["waits"]] == [w["counts"] for w in everything]
    assert all(w["sum"] is None for w in window["waits"])
    assert window["day_before"]["waits"] == []
    only = run.api.data("/api/stats/wait?stage=prefetch&queue=reports&taskname=demo.app.slow")
    assert [(w["stage"], w["queue"], w["task"]) for w in only["waits"]] == [
        ("prefetch", "reports", "demo.app.slow")
    ]
    for query in ("stage=nope", "minutes=0", "compare=1", "minutes=x"):
        status, _, body = run.api.get(f"/api/stats/wait?{query}")
        assert status == 400 and b"error" in body, query


def test_metrics_histograms(run: Run) -> None:
    expected = expected_waits(run.recorder.recorded())
    _, _, body = run.api.get("/metrics")
    lines = body.decode().splitlines()
    for stage in ("queue", "prefetch"):
        assert f"# TYPE pollen_task_{stage}_wait_seconds histogram" in lines
    for (stage, queue, task), seconds in expected.items():
        labels = f'queue="{queue}",task="{task}"'
        assert f"pollen_task_{stage}_wait_seconds_count{{{labels}}} {float(len(seconds))}" in lines
        inf = f'pollen_task_{stage}_wait_seconds_bucket{{{labels},le="+Inf"}} '
        assert inf + f"{float(len(seconds))}" in lines
        below_1s = sum(1 for s in seconds if s <= 1.0)
        le1 = f'pollen_task_{stage}_wait_seconds_bucket{{{labels},le="1.0"}} {float(below_1s)}'
        assert le1 in lines


def test_oldest_waiting_message(run: Run) -> None:
    sent = {u: t["sent"] for u, t in run.recorder.tasks()}
    first = run.backlog[0]

    def samples() -> dict[str, Any]:
        return {q["name"]: q for q in run.api.data("/api/queues/length")["active_queues"]}

    # the backlog's oldest message is the first one sent; its age counts from its task-sent
    wait_for(
        lambda: (samples()[BACKLOG].get("oldest") or {}).get("since") is not None,
        timeout=30,
        message="the backlog's oldest message resolved",
    )
    now = time.time()
    q = samples()
    backlog, stamped = q[BACKLOG], q[STAMPED]
    assert backlog["messages"] == 3
    assert backlog["oldest"]["task_id"] == first
    assert backlog["oldest"]["since"] == sent[first]
    assert 0 <= backlog["oldest"]["age"] <= now - sent[first]
    # a message with a timestamp property is aged by it
    assert stamped["oldest"]["since"] == STAMP and stamped["oldest"]["age"] > 0
    # consumed queues are empty: nothing waits
    assert q["celery"]["messages"] == 0 and q["celery"]["oldest"] is None
    _, _, body = run.api.get("/metrics")
    ages = [
        line
        for line in body.decode().splitlines()
        if line.startswith("pollen_queue_oldest_message_age_seconds{")
    ]
    assert {line.split('"')[1] for line in ages} == {BACKLOG, STAMPED}
