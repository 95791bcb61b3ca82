"""Outages of Redis and of the broker during a stream: the collector, the API and the enabler
wait them out and reconnect by themselves, and nothing is lost (RabbitMQ redelivers what was
not acknowledged; the state after the outage equals a no-fault run of the same stream)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import aiohttp
import pytest
import redis
from celery import Celery

from shared.keys import Keys
from tests.support.api import Api
from tests.support.clients import WsReader
from tests.support.replies import raw_hash
from tests.support.servers import (
    Process,
    RabbitNode,
    RedisServer,
    celery_worker,
    pollen_env,
    private_rabbitmq_possible,
    rabbitmqctl,
    service,
    wait_for,
)
from tests.support.streams import publish_tasks
from tests.support.workloads import applied_events, assert_same_state, publish_mixed, queue_drained


def applied(r: redis.Redis, keys: Keys) -> int:
    return applied_events(r, keys)


def ws_status(url: str) -> int:
    """The status of a WebSocket handshake: 101 when it succeeds (then closed at once)."""

    async def attempt() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5)):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    return asyncio.run(asyncio.wait_for(attempt(), 15))


def test_redis_killed_and_restarted_mid_stream(amqp_url: str, tmp_path: Path) -> None:
    """Redis (with AOF) is killed mid-stream under a collector and an API: the API answers
    503 at once while Redis is away (never hangs), both reconnect by themselves, and the state
    afterwards equals a no-fault run of the same events."""
    # appendfsync always: what Redis acknowledged survives kill -9, so an exact count is fair
    state = RedisServer(
        tmp_path / "state", None, "--appendonly", "yes", "--appendfsync", "always"
    ).start()
    ref_server = RedisServer(tmp_path / "ref").start()
    redis_url = f"redis://127.0.0.1:{state.port}/0"
    keys = Keys("outage")
    env = pollen_env(amqp_url, redis_url, "outage", event_queue="pollen-outage", batch_size="100")
    collector = service("collector", env, tmp_path / "collector.log")
    # the no-fault run: the same events through a queue of its own into a Redis left alone
    ref_env = pollen_env(amqp_url, ref_server.url, "outage", event_queue="pollen-outage-ref")
    reference = service("collector", ref_env, tmp_path / "reference.log")
    api: Api | None = None
    tasks, seed = 4000, 21
    sent: list[int] = []
    try:
        api = Api(
            pollen_env(amqp_url, redis_url, "outage", api_redis_timeout="1"), tmp_path / "api.log"
        )
        r = redis.Redis.from_url(redis_url)
        ref = redis.Redis.from_url(ref_server.url)
        wait_for(lambda: r.zcard(keys.collectors), timeout=20, message="collector up")
        wait_for(lambda: ref.zcard(keys.collectors), timeout=20, message="reference up")
        sender = threading.Thread(
            target=lambda: sent.append(publish_mixed(amqp_url, tasks, seed, per_second=1000.0))
        )
        sender.start()
        wait_for(lambda: applied(r, keys) > 4000, timeout=30, message="events flowing")
        assert api.get("/api/tasks?limit=5")[0] == 200
        state.kill()

        # while Redis is away every read answers 503 at once (the client would time out
        # after 10 s: a hang fails the test), liveness stays up
        for path in (
            "/api/tasks?limit=5",
            "/api/task/info/00000000-0000-4000-8000-000000000000",
            "/api/task/types",
            "/api/workers",
            "/api/workers?status=1",
            "/api/queues/length",
            "/metrics",
        ):
            status, _, body = api.request("GET", path, timeout=10)
            assert status == 503, (path, status, body[:300])
            assert b"state store unavailable" in body, body[:300]
        assert api.request("GET", "/readyz", timeout=10)[0] == 503
        assert api.request("GET", "/healthz", timeout=10)[0] == 200
        # the event relay notices the lost subscription and refuses new clients with a 503
        ws_url = f"{api.url.replace('http', 'ws')}/api/events"
        wait_for(lambda: ws_status(ws_url) == 503, timeout=60, message="the relay answering 503")
        # the collector has met the outage (its one log line is checked at the end)
        wait_for(
            lambda: "redis unavailable" in collector.output(),
            timeout=60,
            message="the collector noticing the outage",
        )
        # the stream goes on into RabbitMQ meanwhile; what is checked holds for any length
        time.sleep(1.0)
        assert collector.alive() and api.process.alive()
        state.start()
        sender.join(60)
        assert sent, "the publisher failed"
        total = sent[0]
        r = redis.Redis.from_url(redis_url)
        wait_for(lambda: applied(r, keys) >= total, timeout=60, message="all applied")
        wait_for(lambda: applied(ref, keys) >= total, timeout=60, message="reference applied")
        # no event applied twice: with both queues drained no redelivery is left to arrive
        vhost = amqp_url.rsplit("/", 1)[1]
        for name in ("pollen-outage", "pollen-outage-ref"):
            wait_for(
                partial(queue_drained, vhost, name),
                timeout=60,
                interval=0.5,
                message=f"queue {name} drained",
            )
        assert applied(r, keys) == total
        assert assert_same_state(r, "outage", ref, "outage") > tasks

        # the API is back by itself: reads, readiness and live events
        wait_for(lambda: api.get("/readyz")[0] == 200, timeout=20, message="API ready again")
        status, _, body = api.get("/api/tasks?limit=1000")
        assert status == 200 and len(json.loads(body)) == 1000
        wait_for(lambda: ws_status(ws_url) == 101, timeout=20, message="the relay back")
        reader = WsReader(f"{ws_url}?type=task-sent")
        reader.start()
        assert reader.connected.wait(20)
        more = 50
        publish_mixed(amqp_url, more, seed, start=tasks)
        wait_for(lambda: len(reader.messages) >= more, timeout=30, message="live events after it")
        reader.stop_flag.set()
        reader.join(10)
        assert reader.closed is None, reader.closed
        assert len(reader.messages) == more
    finally:
        collector.stop()
        reference.stop()
        if api is not None:
            api.stop()
        state.stop()
        ref_server.stop()
    log = collector.output()
    assert log.count("redis unavailable") == 1, log  # one line per outage, no crash loop
    assert "redis is back" in log
    assert "Traceback" not in log
    api_log = api.process.output() if api is not None else ""
    assert "Traceback" not in api_log, api_log[-3000:]


def test_rabbitmq_connection_dropped_mid_stream(amqp_url: str, tmp_path: Path) -> None:
    """Closing every broker connection (as a RabbitMQ restart does) makes the collector
    reconnect by itself; the named queue kept the events meanwhile."""
    state = RedisServer(tmp_path / "state").start()
    redis_url = f"redis://127.0.0.1:{state.port}/0"
    keys = Keys("outage")
    env = pollen_env(amqp_url, redis_url, "outage", event_queue="pollen-outage-2", batch_size="100")
    collector = service("collector", env, tmp_path / "collector.log")
    tasks = 3000
    vhost = amqp_url.rsplit("/", 1)[1]
    try:
        r = redis.Redis.from_url(redis_url)
        wait_for(lambda: r.zcard(keys.collectors), timeout=20, message="collector up")
        sender = threading.Thread(
            target=publish_tasks, args=(amqp_url, tasks), kwargs={"per_second": 1500.0}
        )
        sender.start()
        wait_for(lambda: applied(r, keys) > 1000, timeout=30, message="events flowing")
        listing = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
        pids = [
            line.split("\t")[0]
            for line in listing.stdout.splitlines()
            if f"\t{vhost}\t" in line and "pollen-collector" in line
        ]
        assert pids, listing.stdout
        for pid in pids:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "test: broker restart"],
                capture_output=True,
                timeout=30,
            )
        sender.join(60)
        wait_for(lambda: applied(r, keys) >= tasks * 3, timeout=60, message="all applied")
        # no event applied twice: with the queue drained no redelivery is left to arrive
        wait_for(
            partial(queue_drained, vhost, "pollen-outage-2"),
            timeout=60,
            interval=0.5,
            message="queue pollen-outage-2 drained",
        )
        assert applied(r, keys) == tasks * 3
    finally:
        collector.stop()
        state.stop()
    log = collector.output()
    assert "broker unavailable" in log
    assert "Traceback" not in log


def task_state(r: redis.Redis, keys: Keys, uuid: str) -> str | None:
    raw = r.hget(keys.shard_for(uuid).task(uuid), "state")
    return json.loads(raw) if raw else None


def queue_sample_time(r: redis.Redis, keys: Keys, queue: str) -> float:
    raw = r.hget(keys.queues, queue)
    return float(json.loads(raw)["time"]) if raw else 0.0


@pytest.mark.skipif(
    not private_rabbitmq_possible(),
    reason="no /usr/lib/rabbitmq/bin/rabbitmq-server to start a private node "
    "(test_rabbitmq_connection_dropped_mid_stream covers reconnection on the shared node)",
)
def test_rabbitmq_restarted_under_collector_enabler_and_worker(tmp_path: Path) -> None:
    """A RabbitMQ node of the test's own is stopped and started again between two parts of a
    stream. The collector, the enabler and a Celery worker reconnect by themselves: the
    durable named queue keeps what is published while the collector is still reconnecting,
    every event is applied once, the enabler samples queues again and turns task events back
    on for the worker (which forgets them when it reconnects)."""
    node = RabbitNode(tmp_path / "rabbit").start()
    state = RedisServer(tmp_path / "state").start()
    keys = Keys("restart")
    r = redis.Redis.from_url(state.url)
    settings = {"event_queue": "pollen-restart", "batch_size": "200"}
    env = pollen_env(node.url, state.url, "restart", **settings)
    procs: list[Process] = []
    app = Celery("restart-client", broker=node.url)
    try:
        collector = service("collector", env, tmp_path / "collector.log")
        enabler = service(
            "enabler",
            pollen_env(
                node.url,
                state.url,
                "restart",
                enable_interval="1",
                queue_interval="0.5",
                inspect_interval="5",
            ),
            tmp_path / "enabler.log",
        )
        # a worker started without task events: only the enabler turns them on
        worker = celery_worker(
            node.url,
            tmp_path / "worker.log",
            "rr@faults",
            task_events=False,
        )
        procs += [collector, enabler, worker]
        wait_for(lambda: r.zcard(keys.collectors), timeout=30, message="collector up")

        def run_task(x: int) -> None:
            """Tasks on the worker until one is seen succeeding: the worker sends task events
            only once the enabler has turned them on (tasks before that are not seen). Every
            task sent counts, however late its events arrive."""
            sent: list[str] = []

            def seen() -> bool:
                sent.append(app.send_task("demo.app.add", (x, x)).id)
                return any(task_state(r, keys, i) == "SUCCESS" for i in sent)

            wait_for(seen, timeout=90, interval=1.0, message=f"a task seen succeeding ({x})")

        run_task(1)
        first = publish_mixed(node.url, 1500, seed=31)
        wait_for(lambda: applied(r, keys) >= first + 3, timeout=60, message="part one applied")

        node.stop()
        # both have met the outage (the logs are checked at the end), and live through it
        wait_for(
            lambda: (
                "broker unavailable" in collector.output()
                and "broker unavailable" in enabler.output()
            ),
            timeout=60,
            message="the collector and the enabler noticing the outage",
        )
        assert collector.alive() and enabler.alive()
        node.start()
        back = time.time()
        # published while the collector is still reconnecting: the durable queue keeps them
        second = publish_mixed(node.url, 1500, seed=31, start=1500)
        total = first + second
        wait_for(lambda: applied(r, keys) >= total + 3, timeout=90, message="part two applied")
        wait_for(
            lambda: queue_sample_time(r, keys, "celery") > back,
            timeout=60,
            message="the enabler sampling queues again",
        )
        run_task(2)
        # a fixed wait, to prove an absence: a redelivered event applied twice would arrive
        # after the counts reached the total (the private node's queue is not polled here).
        # A slow machine can only make this pass, never fail, wrongly
        time.sleep(1.0)
        # the total and the worker's share from one snapshot: the worker's heartbeats keep
        # coming, and one landing between two reads would make the difference off by one
        pipe = r.pipeline(transaction=True)
        for shard in keys.all_shards:
            pipe.hgetall(shard.counts)
        counts = [(f, int(v)) for h in pipe.execute() for f, v in raw_hash(h).items()]
        worker_events = sum(n for f, n in counts if f.decode().startswith("rr@faults"))
        # every event of the stream applied once (the rest are the worker's own)
        assert sum(n for _, n in counts) - worker_events == total
        assert collector.alive() and enabler.alive() and worker.alive()
    finally:
        app.close()
        for p in reversed(procs):
            p.stop()
        node.stop()
        state.stop()
    for name, proc in (("collector", procs[0]), ("enabler", procs[1])):
        log = proc.output()
        assert "broker unavailable" in log, f"{name}: {log[-2000:]}"
        assert "Traceback" not in log, f"{name}: {log[-3000:]}"
        # every outage the service reported has ended
        assert log.rindex("broker is back") > log.rindex("broker unavailable"), log[-3000:]
