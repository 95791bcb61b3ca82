"""The enabler process against real workers, a real collector and real brokers."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Exchange, Queue

from shared.inspected import INSPECT_METHODS
from tests.support import readback
from tests.support.api import Api
from tests.support.cluster import (
    KEYS,
    NAMESPACE,
    client,
    collector,
    enabler,
    ensure_rabbitmq_management,
    inspect_data,
    lease_holder,
    running,
    wait_worker_up,
)
from tests.support.replies import entries, raw_list
from tests.support.servers import RedisServer, celery_worker, wait_for


def queue_sample(state: redis.Redis, name: str) -> dict[str, Any] | None:
    import msgspec

    raw = state.hget(KEYS.queues, name)
    return msgspec.json.decode(raw) if isinstance(raw, bytes) else None


def test_events_inspect_and_queues_on_redis(
    broker_url: str, state_url: str, state: redis.Redis, logs: Path
) -> None:
    host = f"w1-{uuid.uuid4().hex[:6]}@test"
    late = f"w2-{uuid.uuid4().hex[:6]}@test"
    app = client(broker_url)
    coll = collector(broker_url, state_url, logs / "collector.log")
    w1 = celery_worker(
        broker_url, logs / "w1.log", host, pool="threads", concurrency=2, task_events=False
    )
    with running(coll, w1):
        wait_worker_up(broker_url, host)
        wait_for(
            lambda: readback.worker(state, KEYS, host, time.time())["alive"],
            timeout=30,
            message="w1's heartbeats in Pollen",
        )
        # started without -E: the worker runs tasks but sends no task events
        before = app.send_task("demo.app.add", (1, 1))
        wait_for(lambda: f"[{before.id}] succeeded" in w1.output(), timeout=30, message="task run")
        # a fixed wait, to prove an absence: no task event arrives. Nothing in Pollen says
        # that none is on its way; a slow machine can only make this pass, never fail, wrongly
        time.sleep(1.0)
        assert readback.task(state, KEYS, before.id) is None

        en = enabler(
            broker_url,
            state_url,
            logs / "enabler.log",
            enable_interval="1",
            # longer than the test: a new worker's data can only come from worker-online
            inspect_interval="120",
            queue_interval="1",
            queues="backlog",
        )
        with running(en):
            sent: list[str] = []

            def a_task_reached_pollen() -> bool:
                sent.append(app.send_task("demo.app.add", (2, 2)).id)
                return any(
                    (t := readback.task(state, KEYS, i)) is not None and t["state"] == "SUCCESS"
                    for i in sent
                )

            wait_for(a_task_reached_pollen, timeout=30, interval=0.5, message="task events on")

            # the first round after taking the lease inspected w1
            def inspected(hostname: str) -> bool:
                data = inspect_data(state, KEYS, hostname)
                return all(m in data for m in INSPECT_METHODS)

            wait_for(lambda: inspected(host), timeout=60, message="w1 inspected")
            data = inspect_data(state, KEYS, host)
            assert "demo.app.add" in data["registered"]
            assert [q["name"] for q in data["active_queues"]] == ["celery"]
            assert data["stats"]["pool"]["max-concurrency"] == 2
            assert data["timestamp"] == max(v for k, v in data.items() if k.endswith(":time"))
            for method in ("active", "reserved", "scheduled", "revoked"):
                assert isinstance(data[method], list), method

            # a worker coming online is inspected at once
            w2 = celery_worker(broker_url, logs / "w2.log", late, pool="threads", concurrency=3)
            with running(w2):
                wait_for(lambda: inspected(late), timeout=60, message="w2 inspected on online")
                assert inspect_data(state, KEYS, late)["stats"]["pool"]["max-concurrency"] == 3
                assert state.zscore(KEYS.inspected, late) is not None

            # queue lengths: a backlog nobody consumes, spread over priority sub-queues
            for priority in (None, 5, 9):
                app.send_task("demo.app.add", (0, 0), queue="backlog", priority=priority)
            broker = redis.Redis.from_url(broker_url)
            sub_queues = [
                k.decode() for k in raw_list(broker.keys("backlog*")) if k != b"backlog"
            ]  # kombu's '<queue>\x06\x16<step>' lists
            assert sub_queues and all("\x06\x16" in k for k in sub_queues)
            assert int(broker.llen("backlog")) < 3
            broker.close()
            wait_for(
                lambda: (s := queue_sample(state, "backlog")) and s["messages"] == 3,
                timeout=60,
                message="backlog of 3 counted",
            )
            celery_queue = queue_sample(state, "celery")  # from the workers' active_queues
            assert celery_queue is not None and celery_queue["consumers"] is None
            history = entries(state.xrange(KEYS.queues_history))
            assert history, "no per-minute history entry"
            assert int(history[-1][0].split(b"-")[0]) % 60_000 == 0
        assert "Traceback" not in en.output(), en.output()
    app.close()


def test_failover(broker_url: str, state_url: str, state: redis.Redis, logs: Path) -> None:
    # a lease of 4.5 s renewed every second (enable_interval 3): the holder keeps it through
    # a stall of over 3 s, so a loaded machine does not hand it over while the holder lives
    settings = {"enable_interval": "3", "inspect_interval": "60", "queue_interval": "0.5"}
    first = enabler(broker_url, state_url, logs / "first.log", **settings)
    second = enabler(broker_url, state_url, logs / "second.log", **settings)
    with running(first, second):
        wait_for(lambda: lease_holder(state, KEYS), timeout=60, message="a lease holder")
        wait_for(
            lambda: "starting" in second.output() and "starting" in first.output(),
            timeout=60,
            message="both enablers started",
        )
        holder = lease_holder(state, KEYS)
        assert holder is not None
        active, standby = (first, second) if f":{first.pid}:" in holder else (second, first)
        assert f":{active.pid}:" in holder
        # a fixed wait, to prove an absence: over several renewals the standby does not take
        # over a live lease (no state says it never will)
        time.sleep(3.0)
        assert lease_holder(state, KEYS) == holder
        assert "is active" not in standby.output()

        active.signal(signal.SIGKILL)
        killed = time.time()
        wait_for(
            lambda: f":{standby.pid}:" in (lease_holder(state, KEYS) or ""),
            timeout=60,
            message="the standby taking the lease",
        )
        # the new active one does the work: fresh queue samples
        wait_for(
            lambda: (s := queue_sample(state, "celery")) and s["time"] > killed,
            timeout=60,
            message="queue samples by the new active enabler",
        )
        standby.stop()
        assert lease_holder(state, KEYS) is None, "a stopping enabler releases its lease"
        assert "is active" in standby.output()


#: the timestamp property of the messages of test_rabbitmq_queue_lengths
STAMP = 1_700_000_000


def test_rabbitmq_queue_lengths(
    amqp_url: str, state_url: str, state: redis.Redis, logs: Path
) -> None:
    app = client(amqp_url)
    backlog = Queue(
        "backlog", Exchange("backlog"), "backlog", queue_arguments={"x-max-priority": 10}
    )
    app.conf.task_queues = [backlog]
    for priority in (0, 5, 9):
        # a timestamp property: what RabbitMQ's management API ages the head message by
        app.send_task("demo.app.add", (1, 2), queue=backlog, priority=priority, timestamp=STAMP)
    app.close()
    # passive declare; 'missing' does not exist and must not be reported
    passive = enabler(
        amqp_url,
        state_url,
        logs / "passive.log",
        namespace="amqp1",
        queue_interval="0.5",
        queues="backlog,missing",
    )
    with running(passive):
        keys = KEYS.__class__("amqp1")
        wait_for(lambda: state.hget(keys.queues, "backlog"), timeout=20, message="a sample")
        import msgspec

        sample = msgspec.json.decode(state.hget(keys.queues, "backlog") or b"null")
        assert sample["messages"] == 3 and sample["consumers"] == 0
        assert sample["oldest"] is None  # a passive declare cannot tell
        assert state.hget(keys.queues, "missing") is None
        # and in /metrics: the length and the consumer count RabbitMQ answered
        reader = Api({"POLLEN_REDIS_URL": state_url, "POLLEN_NAMESPACE": "amqp1"}, logs / "api.log")
        try:
            _, _, body = reader.get("/metrics")
        finally:
            reader.stop()
        lines = body.decode().splitlines()
        assert 'pollen_queue_messages{queue="backlog"} 3.0' in lines
        assert 'pollen_queue_consumers{queue="backlog"} 0.0' in lines

    api = ensure_rabbitmq_management()
    managed = enabler(
        amqp_url,
        state_url,
        logs / "managed.log",
        namespace="amqp2",
        queue_interval="0.5",
        queues="backlog",
        broker_api=api,
    )
    with running(managed):
        keys = KEYS.__class__("amqp2")
        # the management API refreshes its figures every few seconds, the count and the head
        # message's timestamp not necessarily in the same refresh
        wait_for(
            lambda: (
                (raw := state.hget(keys.queues, "backlog"))
                and msgspec.json.decode(raw)["messages"] == 3
                and msgspec.json.decode(raw)["oldest"] is not None
            ),
            timeout=30,
            message="backlog counted and aged through the management API",
        )
        sample = msgspec.json.decode(state.hget(keys.queues, "backlog") or b"null")
        assert sample["oldest"]["since"] == STAMP and sample["oldest"]["age"] > 0
    assert "Traceback" not in managed.output(), managed.output()


@pytest.mark.asyncio
async def test_no_answer_is_stored_with_the_error(
    broker_url: str, state_url: str, state: redis.Redis
) -> None:
    from services.enabler.service import Enabler
    from shared.settings import load

    settings = load(
        {
            "POLLEN_BROKER_URL": broker_url,
            "POLLEN_REDIS_URL": state_url,
            "POLLEN_NAMESPACE": NAMESPACE,
            "POLLEN_INSPECT_TIMEOUT": "0.5",
        }
    )
    en = Enabler(settings)
    try:
        missing = await en.inspect(["ghost@nowhere"], ["stats", "registered"])
    finally:
        await en.close()
    assert missing == {"stats": {"ghost@nowhere"}, "registered": {"ghost@nowhere"}}
    data = inspect_data(state, KEYS, "ghost@nowhere")
    assert data["stats:error"]["error"] == "no answer within 0.5 s"
    assert "stats" not in data  # no answer is ever invented
    assert state.ttl(KEYS.inspect("ghost@nowhere")) > 0


@pytest.mark.asyncio
async def test_broker_outage_logged_once(
    state_url: str, state: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from services.enabler.service import Enabler
    from shared.settings import load
    from tests.support.servers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = load(
        {"POLLEN_BROKER_URL": dead, "POLLEN_REDIS_URL": state_url, "POLLEN_NAMESPACE": "dead"}
    )
    en = Enabler(settings)
    try:
        with caplog.at_level("INFO", logger="pollen.enabler"):
            assert await en.hold_lease()
            for _ in range(3):
                assert not await en.enable_events()
            with pytest.raises(en.broker_errors):
                await en.sample_queues()
    finally:
        await en.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "broker unavailable" in warnings[0].getMessage()
    assert en.broker_backoff.attempts == 4


def test_redis_outage(
    server: RedisServer, broker_url: str, state_url: str, state: redis.Redis, logs: Path
) -> None:
    """Redis (broker and state here) restarts under the enabler: it keeps running, logs the
    outage once, and takes the lease and its work up again."""
    en = enabler(
        broker_url, state_url, logs / "outage.log", enable_interval="1", queue_interval="0.5"
    )
    with running(en):
        wait_for(lambda: lease_holder(state, KEYS), timeout=60, message="the lease")
        holder = lease_holder(state, KEYS)
        server.kill()
        # the enabler has met the outage (its one log line is checked below)
        wait_for(
            lambda: "Redis unavailable" in en.output(),
            timeout=60,
            message="the enabler noticing the outage",
        )
        # more failed renewals and samples; what is checked holds for any length of this
        time.sleep(2.0)
        assert en.alive()
        server.start()
        wait_for(
            lambda: lease_holder(state, KEYS) == holder, timeout=60, message="lease taken again"
        )
        restarted = time.time()
        wait_for(
            lambda: (s := queue_sample(state, "celery")) and s["time"] > restarted,
            timeout=60,
            message="queue samples after the outage",
        )
        output = en.output()
    assert output.count("Redis unavailable") == 1, output
    assert output.count("Redis is back") == 1, output
    assert "Traceback" not in output, output
