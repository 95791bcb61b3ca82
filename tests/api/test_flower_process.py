"""Flower itself, over HTTP: a real ``celery flower`` process and the real Pollen collector and
API listen to one private Redis broker; the same events are published once through celery's
EventDispatcher (as workers and clients send them), and Flower's ``/api/tasks`` (several
queries) and ``/api/task/info`` (every task) must equal Pollen's. Sorting by name or state is
left out: inside a group the order differs by design (docs/api.md, "Divergences")."""

from __future__ import annotations

import datetime
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from celery import Celery

from tests.support.api import Api
from tests.support.dataset import task_events
from tests.support.servers import (
    PYTHON,
    Process,
    RedisServer,
    free_port,
    pollen_env,
    service,
    wait_for,
)

TASKS = 200
EVENTS = task_events(TASKS, seed=23)
TASK_IDS = sorted({e["uuid"] for e in EVENTS if "uuid" in e})
# the Dispatcher stamps these itself (one dispatcher per hostname keeps each sender's clock)
STAMPED = ("type", "hostname", "clock", "pid", "utcoffset", "local_received")
PROBE = "probe@pollen-test"


def _minute(offset_minutes: float) -> str:
    first = min(e["timestamp"] for e in EVENTS)
    return datetime.datetime.fromtimestamp(first + offset_minutes * 60).strftime("%Y-%m-%d %H:%M")


QUERIES: list[dict[str, Any]] = [
    {},
    {"state": "SUCCESS"},
    {"state": "FAILURE"},
    {"state": "PENDING"},
    {"taskname": "tasks.add"},
    {"taskname": "PROJ.REPORTS.BUILD"},
    {"workername": "celery@beta"},
    {"state": "SUCCESS", "taskname": "tasks.mul"},
    {"state": "STARTED", "workername": "celery@alpha"},
    {"sort_by": "received"},
    {"sort_by": "-received"},
    {"sort_by": "started"},
    {"sort_by": "-started", "state": "SUCCESS"},
    {"received_start": _minute(20), "received_end": _minute(90)},
    {"search": "tasks.add"},
    {"search": "state:failure"},
    {"search": "args:hello"},
    {"search": "kwargs:user=bob"},
    {"search": "(name:add OR name:mul) state:success"},
    {"search": "grüße"},
    {"search": "gamma", "sort_by": "-received"},
    {"limit": 10, "offset": 7},
    {"limit": 25, "offset": 150, "sort_by": "received"},
    {"limit": 5, "offset": 3, "state": "SUCCESS"},
]


class Flower:
    """A ``celery flower`` process on a free port, its HTTP API open to the test."""

    def __init__(self, broker: str, log: Path) -> None:
        self.port = free_port()
        args = [PYTHON, "-m", "celery", "--broker", broker, "flower"]
        args += [f"--port={self.port}", "--address=127.0.0.1"]
        self.process = Process(args, log, {"FLOWER_UNAUTHENTICATED_API": "true"})
        try:
            wait_for(self._up, timeout=60, interval=0.2, message="Flower's HTTP port")
        except BaseException:
            self.process.stop()
            raise

    def _up(self) -> bool:
        if not self.process.alive():
            raise RuntimeError(f"flower exited:\n{self.process.output()}")
        return self.get("/healthcheck")[0] == 200

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body, object_pairs_hook=list)


@pytest.fixture
def flower_and_pollen(tmp_path: Path, start_api: Any) -> Iterator[tuple[Flower, Api, str]]:
    server = RedisServer(tmp_path / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    state = f"redis://127.0.0.1:{server.port}/1"
    collector = None
    flower = None
    try:
        collector = service(
            "collector", pollen_env(broker, state, "fp"), tmp_path / "collector.log"
        )
        flower = Flower(broker, tmp_path / "flower.log")
        api: Api = start_api(server, "fp", redis_url=state)
        yield flower, api, broker
    finally:
        if flower is not None:
            flower.process.stop()
        if collector is not None:
            collector.stop()
        server.stop()


def publish(broker: str, events: list[dict[str, Any]]) -> None:
    """Send ``events`` through celery's EventDispatcher, one dispatcher per sender."""
    app = Celery(broker=broker)
    with app.connection_for_write() as conn:
        dispatchers: dict[str, Any] = {}
        for event in events:
            host = event["hostname"]
            if host not in dispatchers:
                dispatchers[host] = app.events.Dispatcher(conn, hostname=host, enabled=True)
            fields = {k: v for k, v in event.items() if k not in STAMPED}
            dispatchers[host].send(event["type"], **fields)
        for dispatcher in dispatchers.values():
            dispatcher.close()


LIFECYCLE_TIMES = ("received", "started", "succeeded", "failed", "retried", "revoked", "rejected")


def listing(pairs: list[Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """``/api/tasks`` pairs with each task's children sorted (a set in both). The ``clock`` of
    a task known only from its task-sent is left out: celery's receiver replaces a client's
    clock with its own, which differs between two receivers (docs/api.md, docs/semantics.md)."""
    out = []
    for uuid, fields in pairs:
        d = dict(fields)
        sent_only = d.get("sent") is not None and all(d.get(t) is None for t in LIFECYCLE_TIMES)
        out.append(
            (
                uuid,
                [
                    (k, sorted(v) if k == "children" else v)
                    for k, v in fields
                    if not (k == "clock" and sent_only)
                ],
            )
        )
    return out


def test_flower_process_and_pollen_answer_the_same(
    flower_and_pollen: tuple[Flower, Api, str],
) -> None:
    flower, api, broker = flower_and_pollen

    # both are listening once a probe worker's heartbeat reaches both
    def probed() -> bool:
        publish(broker, [{"type": "worker-heartbeat", "hostname": PROBE, "freq": 2.0}])
        in_flower = PROBE in dict(flower.json("/api/workers?status=1"))
        return in_flower and PROBE in dict(api.json("/api/workers?status=1"))

    wait_for(probed, timeout=60, interval=0.5, message="Flower and Pollen receiving events")
    publish(broker, EVENTS)

    def everything() -> bool:
        got_flower = flower.json("/api/tasks?limit=1000")
        return len(got_flower) == len(TASK_IDS) == len(api.json("/api/tasks?limit=1000"))

    wait_for(everything, timeout=60, interval=0.5, message="every task in Flower and Pollen")

    for query in QUERIES:
        path = "/api/tasks?" + urlencode({"limit": 1000, **query})
        expected = listing(flower.json(path))
        assert listing(api.json(path)) == expected, query
        assert expected, query  # each query selects something

    for uuid in TASK_IDS:
        path = f"/api/task/info/{uuid}"
        expected = listing([(uuid, flower.json(path))])
        assert listing([(uuid, api.json(path))]) == expected, uuid
    assert flower.get("/api/task/info/no-such-task")[0] == api.get("/api/task/info/x")[0] == 404

    # Flower's workers page as JSON (what scripts scrape): the same workers, fields and counts;
    # celery keeps a worker's last few heartbeat times, Pollen the newest; each is the time its
    # own receiver got the beat, so the two differ by the receivers' delays (docs/api.md)
    def by_host(answer: Any) -> dict[str, dict[str, Any]]:
        rows = [dict(row) for row in dict(answer)["data"]]
        for row in rows:
            beats = row.pop("heartbeats")
            row["last_heartbeat"] = max(beats) if beats else None
        return {row["hostname"]: row for row in rows}

    expected_workers = by_host(flower.json("/workers?json=1"))
    assert expected_workers
    got_workers = by_host(api.json("/workers?json=1"))
    assert got_workers.keys() == expected_workers.keys()
    for host, flower_row in expected_workers.items():
        pollen_row = got_workers[host]
        beats = (pollen_row.pop("last_heartbeat"), flower_row.pop("last_heartbeat"))
        assert (beats[0] is None) == (beats[1] is None), (host, beats)
        assert beats[0] is None or abs(beats[0] - beats[1]) < 30, (host, beats)
        keys = pollen_row.keys() | flower_row.keys()
        diff = {k: (pollen_row.get(k), flower_row.get(k)) for k in keys}
        assert {k: v for k, v in diff.items() if v[0] != v[1]} == {}, host
