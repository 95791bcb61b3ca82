"""Redaction and retention rules end to end: a real worker runs tasks whose arguments and
results hold secrets; the real collector, configured with key patterns and a task name rule,
keeps them out of Redis; the API and a live WebSocket client show the markers, never the
secrets. A retention rule by task name drops one task's successes at once and keeps the rest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from shared.redaction import MARKER
from tests.support.api import Api
from tests.support.clients import WsReader
from tests.support.servers import (
    Process,
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)

WORKER = "redact@pollen-test"
#: the kwargs secrets, and the mul task's result (its args, not redacted, hold one copy)
SECRETS = (b"hunter2", b"tok-secret", b"result-secretresult-secret")


class Run:
    def __init__(self, api: Api, state: redis.Redis, ws: WsReader, ids: dict[str, str]) -> None:
        self.api, self.state, self.ws, self.ids = api, state, ws, ids


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("redaction")
    server = RedisServer(workdir / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    env = pollen_env(
        broker,
        f"redis://127.0.0.1:{server.port}/1",
        "rd",
        redact_keys="password,*token*",
        redact_fields="demo.app.mul=result",
        task_retention="demo.app.progress=success:0",
    )
    procs: list[Process] = []
    api: Api | None = None
    ws: WsReader | None = None
    state = redis.Redis(port=server.port, db=1)
    app = Celery(broker=broker)
    app.conf.task_send_sent_event = True
    try:
        procs.append(service("collector", env, workdir / "collector.log"))
        procs.append(celery_worker(broker, workdir / "worker.log", WORKER))
        api = Api(env, workdir / "api.log")
        wait_for(lambda: api.data("/api/workers").get(WORKER), timeout=60, message="worker up")
        ws = WsReader(api.url.replace("http", "ws", 1) + "/api/events?type=task-*")
        ws.start()
        assert ws.connected.wait(20)
        ids = {
            # kwargs with secrets under matching keys (the task fails: add takes numbers)
            "kwargs": app.send_task(
                "demo.app.add",
                kwargs={"x": 1, "y": {"password": "hunter2", "api_token": "tok-secret"}},
            ).id,
            # a result redacted by the task's name
            "result": app.send_task("demo.app.mul", ("result-secret", 2)).id,
            # nothing to redact
            "plain": app.send_task("demo.app.add", (2, 3)).id,
            # not kept once it succeeds (its events still stream)
            "dropped": app.send_task("demo.app.progress", (1,)).id,
        }

        def finished() -> bool:
            tasks = api.data("/api/tasks?limit=100")
            kept = [u for k, u in ids.items() if k != "dropped"]
            return all(tasks.get(u, {}).get("state") in ("SUCCESS", "FAILURE") for u in kept)

        wait_for(finished, timeout=60, message="every task finished")
        finals = {"task-succeeded", "task-failed"}
        wait_for(
            lambda: (
                {m.get("uuid") for m in ws.messages if m.get("type") in finals} >= set(ids.values())
            ),
            timeout=30,
            message="the WebSocket client saw every task finish",
        )
        yield Run(api, state, ws, ids)
    finally:
        app.close()
        if ws is not None:
            ws.stop_flag.set()
        if api is not None:
            api.stop()
        for p in procs:
            p.stop()
        state.close()
        server.stop()


def test_no_secret_in_redis(run: Run) -> None:
    for key in run.state.scan_iter(count=1000):
        kind = run.state.type(key)
        dumped = run.state.dump(key) or b""
        value = repr(
            run.state.hgetall(key)
            if kind == b"hash"
            else run.state.xrange(key)
            if kind == b"stream"
            else dumped
        ).encode()
        for secret in SECRETS:
            assert secret not in value, (key, secret)


def test_api_and_websocket_show_the_markers(run: Run) -> None:
    kwargs = run.api.data(f"/api/task/info/{run.ids['kwargs']}")["kwargs"]
    assert kwargs == "{'x': 1, 'y': {'password': " + MARKER + ", 'api_token': " + MARKER + "}}"
    assert run.api.data(f"/api/task/info/{run.ids['result']}")["result"] == MARKER
    assert run.api.data(f"/api/task/info/{run.ids['result']}")["args"] == "('result-secret', 2)"
    assert run.api.data(f"/api/task/info/{run.ids['plain']}")["result"] == "5"
    seen = repr(run.ws.messages).encode()
    for secret in SECRETS:
        assert secret not in seen
    succeeded = [
        m
        for m in run.ws.messages
        if m.get("type") == "task-succeeded" and m["uuid"] == run.ids["result"]
    ]
    assert [m["result"] for m in succeeded] == [MARKER]


def test_retention_by_name_drops_successes_at_once(run: Run) -> None:
    dropped = run.ids["dropped"]
    # the WebSocket saw it succeed; within the collector's age check (a second) it is gone
    assert any(
        m.get("uuid") == dropped and m.get("type") == "task-succeeded" for m in run.ws.messages
    )
    wait_for(
        lambda: dropped not in run.api.data("/api/tasks?limit=100"),
        timeout=10,
        message="the dropped task evicted",
    )
    status, _, _ = run.api.get(f"/api/task/info/{dropped}")
    assert status == 404
    # the other tasks stay
    assert run.api.data(f"/api/task/info/{run.ids['plain']}")["state"] == "SUCCESS"
