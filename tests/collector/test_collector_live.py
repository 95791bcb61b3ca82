"""The collector process against real Celery workers on a Redis broker and on RabbitMQ.

Celery's own EventReceiver listens to the same broker in the test and feeds celery's State;
Pollen's Redis state must match it task by task, and the obvious outcomes must hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.events.state import State

from shared.keys import Keys
from tests.collector.test_oracle import celery_task
from tests.support import readback
from tests.support.replies import raw_hash, raw_list
from tests.support.servers import (
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)


class Recorder:
    """celery's EventReceiver in a thread, keeping the events as celery hands them over."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery(broker=broker_url)
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "celery's event receiver did not start"

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def close(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)

    @property
    def state(self) -> State:
        """celery's State over the events in emission order.

        The receiver hands events over in arrival order, which for one task can differ from
        the order they happened in: a client stamps and publishes task-sent after publishing
        the task, and a fast worker's events may overtake it. Emission order puts each
        task-sent before the task-received of the same attempt; everything else stays in
        arrival order (each sender's events arrive in the order it sent them).
        """
        ordered = [dict(e) for e in list(self.events)]
        for sent in [e for e in ordered if e["type"] == "task-sent"]:
            i = next(k for k, e in enumerate(ordered) if e is sent)
            j = next(
                (
                    k
                    for k, e in enumerate(ordered[:i])
                    if e["type"] == "task-received"
                    and e.get("uuid") == sent["uuid"]
                    and e.get("retries") == sent.get("retries")
                ),
                None,
            )
            if j is not None:
                ordered.insert(j, ordered.pop(i))
        state = State()
        for event in ordered:
            state.event(event)
        return state


def _client(broker_url: str) -> Celery:
    app = Celery(broker=broker_url)
    app.conf.task_send_sent_event = True
    return app


def run_scenario(broker_url: str, redis_url: str, tmp: Path, extra_env: dict[str, str]) -> None:
    namespace = "live"
    keys = Keys(namespace)
    state_redis = redis.Redis.from_url(redis_url)
    recorder = Recorder(broker_url)
    collector = service(
        "collector",
        pollen_env(broker_url, redis_url, namespace, **extra_env),
        tmp / "collector.log",
    )
    worker = celery_worker(broker_url, tmp / "worker.log")
    client = _client(broker_url)
    try:
        wait_for(
            lambda: state_redis.zcard(keys.all_shards[0].workers),
            timeout=30,
            message="the worker's heartbeat in Redis",
        )
        ids: dict[str, Any] = {
            "add": client.send_task("demo.app.add", (1, 2)),
            "fail": client.send_task("demo.app.fail", ("boom",)),
            "flaky": client.send_task("demo.app.flaky", (), {"succeed_on": 1}),
            "reject": client.send_task("demo.app.reject"),
            "progress": client.send_task("demo.app.progress", (2,)),
            "countdown": client.send_task("demo.app.add", (5, 5), countdown=1),
            "revoked": client.send_task("demo.app.add", (0, 0), countdown=2),
        }
        wait_for(
            lambda: readback.task(state_redis, keys, ids["revoked"].id),
            timeout=20,
            message="the countdown task received",
        )
        client.control.revoke(ids["revoked"].id)

        def settled() -> bool:
            for name in ("add", "fail", "flaky", "countdown", "progress"):
                task = readback.task(state_redis, keys, ids[name].id)
                if not task or task["state"] not in ("SUCCESS", "FAILURE"):
                    return False
            revoked = readback.task(state_redis, keys, ids["revoked"].id)
            return bool(revoked and revoked["state"] == "REVOKED")

        wait_for(settled, timeout=60, message="every task finished in Pollen")

        # the last events have reached both listeners: every task finished (the rejected one
        # keeps its state and gets a ``rejected`` time, as in celery) and its task-sent seen,
        # in Pollen and in celery's State alike
        final = ("SUCCESS", "FAILURE", "REVOKED")

        def everything_arrived() -> bool:
            oracle = recorder.state.tasks
            for result in ids.values():
                ours, theirs = readback.task(state_redis, keys, result.id), oracle.get(result.id)
                if ours is None or theirs is None:
                    return False
                if ours["sent"] is None or theirs.sent is None:
                    return False
                if ours["state"] not in final and ours["rejected"] is None:
                    return False
                if theirs.state not in final and theirs.rejected is None:
                    return False
            return True

        wait_for(everything_arrived, timeout=60, message="the last events at both listeners")

        def task(name: str) -> dict[str, Any]:
            found = readback.task(state_redis, keys, ids[name].id)
            assert found is not None, name
            return found

        assert task("add")["result"] == "3" and task("add")["state"] == "SUCCESS"
        assert task("add")["worker"].startswith("w1@")
        assert task("add")["client"] is not None  # task-sent seen
        assert task("fail")["state"] == "FAILURE" and "boom" in task("fail")["exception"]
        assert task("flaky")["state"] == "SUCCESS" and task("flaky")["retries"] == 1
        assert task("countdown")["eta"] is not None
        assert task("revoked")["state"] == "REVOKED"
        assert task("reject")["rejected"] is not None

        # every task, field by field, as celery's State saw the same events (the two
        # listeners receive at their own pace: wait until both have everything)
        def differences() -> list[str]:
            out = []
            oracle = recorder.state
            for uuid, expected in list(oracle.tasks.items()):
                ours = readback.task(state_redis, keys, uuid)
                if ours != celery_task(expected):
                    out.append(
                        f"{uuid} ({expected.name}): ours {ours} celery {celery_task(expected)}"
                    )
            return out

        try:
            wait_for(lambda: not differences(), timeout=60, message="same state as celery")
        except TimeoutError:
            pytest.fail("\n".join(differences()))
        assert len(recorder.state.tasks) >= len(ids)
        assert readback.task_names(state_redis, keys) == recorder.state.task_types()

        def same_liveness(hostname: str) -> bool:
            ours = readback.worker(state_redis, keys, hostname, time.time())
            return bool(ours["alive"] == recorder.state.workers[hostname].alive)

        for hostname, w in recorder.state.workers.items():
            # liveness judged at the same moment on both sides: each listener receives the
            # worker's beats at its own pace, so a beat late on one side (a loaded machine) can
            # make them disagree for a moment; that is polled, not read once
            wait_for(
                partial(same_liveness, hostname),
                timeout=60,
                message=f"the same liveness of {hostname} as celery",
            )
            ours = readback.worker(state_redis, keys, hostname, time.time())
            for field in ("pid", "freq", "sw_ident", "sw_ver", "sw_sys"):
                assert ours[field] == getattr(w, field), field

        first = raw_list(state_redis.zrange(keys.collectors, 0, 0))[0].decode()
        health = raw_hash(state_redis.hgetall(keys.collector(first)))
        assert int(health[b"events_total"]) > 0
    finally:
        worker.stop()
        collector.stop()
        recorder.close()
        state_redis.close()
    assert "Traceback" not in collector.output(), collector.output()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "broker").start()
    yield server
    server.stop()


def test_redis_broker(broker: RedisServer, tmp_path: Path) -> None:
    run_scenario(
        f"redis://127.0.0.1:{broker.port}/0", f"redis://127.0.0.1:{broker.port}/1", tmp_path, {}
    )


def test_rabbitmq_named_queue(amqp_url: str, broker: RedisServer, tmp_path: Path) -> None:
    run_scenario(
        amqp_url,
        f"redis://127.0.0.1:{broker.port}/1",
        tmp_path,
        {"event_queue": "pollen-live-test"},
    )
