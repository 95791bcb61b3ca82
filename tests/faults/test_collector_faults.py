"""The collector under bad input, competing consumers, kill -9 and restarts (real brokers).

Each fault run is compared with a no-fault run of the same stream: a reference collector that
nobody disturbs reads the same events (its own queue on RabbitMQ, the same pub/sub on Redis)
into another namespace, and every key of the two namespaces must hold the same value."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer

from shared.keys import Keys
from tests.support import readback
from tests.support.replies import raw_hash, raw_list
from tests.support.servers import Process, RedisServer, pollen_env, service, wait_for
from tests.support.workloads import (
    applied_events,
    assert_same_state,
    mixed_plan,
    publish_mixed,
    queue_drained,
)

REF = Keys("ref")


def collector(
    broker_url: str, redis_url: str, log: Path, namespace: str = "faults", **settings: str
) -> Process:
    return service("collector", pollen_env(broker_url, redis_url, namespace, **settings), log)


def successes(tasks: int, seed: int) -> int:
    return sum(1 for _, outcome, _ in mixed_plan(tasks, seed) if outcome in SUCCEEDING)


SUCCEEDING = ("success", "progress", "retry")


def wait_listening(r: redis.Redis, keys: Keys, count: int = 1) -> None:
    wait_for(
        lambda: r.zcard(keys.collectors) >= count,
        timeout=20,
        message=f"{count} collector heartbeat(s)",
    )


def wait_subscribed(r: redis.Redis, count: int) -> None:
    """Until ``count`` clients of the Redis broker hold a pub/sub subscription: collectors
    that receive events (a heartbeat in Redis comes before the subscription is active)."""

    def subscribed() -> int:
        clients = r.client_list()
        return sum(1 for c in clients if int(c.get("sub", 0)) + int(c.get("psub", 0)) > 0)

    wait_for(lambda: subscribed() == count, timeout=20, message=f"{count} subscribed collectors")


def reported_events(r: redis.Redis, keys: Keys, proc: Process) -> int:
    """``events_total`` as the collector process last wrote it in its health (id: host-pid)."""
    cid = f"{socket.gethostname()}-{proc.pid}"
    return int(r.hget(keys.collector(cid), "events_total") or 0)


def applied_at_least(r: redis.Redis, keys: Keys, total: int) -> Callable[[], bool]:
    """A ``wait_for`` predicate: ``total`` events applied in ``keys``' namespace."""
    return lambda: applied_events(r, keys) >= total


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


def test_malformed_events_are_counted_and_skipped(server: RedisServer, tmp_path: Path) -> None:
    broker_url, redis_url = server.url, f"redis://127.0.0.1:{server.port}/1"
    keys = Keys("faults")
    r = redis.Redis.from_url(redis_url)
    proc = collector(broker_url, redis_url, tmp_path / "c.log", max_field_bytes="1000")
    try:
        wait_listening(r, keys)
        good = {
            "type": "task-received",
            "uuid": "good-1",
            "hostname": "w@h",
            "timestamp": time.time(),
            "clock": 1,
            "name": "t.ok",
        }
        bodies = [
            b"{not json",
            b"42",
            json.dumps({"type": "task-started", "hostname": "w@h", "timestamp": 1.0}).encode(),
            json.dumps(
                {"type": "task-started", "uuid": "x", "hostname": "w@h", "timestamp": "yesterday"}
            ).encode(),
            json.dumps({"type": "bogus-thing", "hostname": "w@h", "timestamp": 1.0}).encode(),
            json.dumps({"uuid": "x", "hostname": "w@h", "timestamp": 1.0}).encode(),
            json.dumps(
                {"type": "task-started", "uuid": "y", "hostname": "", "timestamp": 1.0}
            ).encode(),
            # a batch with one bad event among good ones: the good ones land
            json.dumps(
                [{"type": "task-started", "hostname": "w@h", "timestamp": 1.0}, good]
            ).encode(),
            json.dumps(
                {
                    "type": "task-failed",
                    "uuid": "big-1",
                    "hostname": "w@h",
                    "timestamp": time.time(),
                    "clock": 2,
                    "exception": "E()",
                    "traceback": "x" * 100_000,
                }
            ).encode(),
        ]
        with Connection(broker_url) as conn:
            producer = Producer(conn.default_channel, exchange=Exchange("celeryev", type="fanout"))
            for body in bodies:
                producer.publish(
                    body,
                    routing_key="task.multi",
                    content_type="application/json",
                    content_encoding="utf-8",
                    serializer=None,
                )
            producer.publish(
                b"\x80\x03pickled",
                routing_key="task.x",
                content_type="application/x-python-serialize",
                content_encoding="binary",
            )

        wait_for(
            lambda: readback.task(r, keys, "big-1") and readback.task(r, keys, "good-1"),
            timeout=60,
            message="the good events",
        )

        def reasons() -> dict[str, int]:
            return {k.decode(): int(v) for k, v in raw_hash(r.hgetall(keys.malformed)).items()}

        expected = {
            "undecodable": 1,
            "not_an_object": 1,
            "missing_field": 2,
            "wrong_type": 1,
            "unknown_type": 1,
            "missing_type": 1,
            "invalid_value": 1,
            "unsupported_content_type": 1,
        }
        wait_for(lambda: reasons() == expected, timeout=60, message=f"counts {expected}")
        assert r.get(keys.malformed_sample("wrong_type")) is not None
        big = readback.task(r, keys, "big-1")
        assert big is not None and big["state"] == "FAILURE"
        assert len(big["traceback"]) < 1100 and "truncated" in big["traceback"]
        assert proc.alive()
        # one log line per reason, not one per event
        publish_again = [b"{not json"] * 20
        with Connection(broker_url) as conn:
            producer = Producer(conn.default_channel, exchange=Exchange("celeryev", type="fanout"))
            for body in publish_again:
                producer.publish(
                    body,
                    routing_key="task.multi",
                    content_type="application/json",
                    content_encoding="utf-8",
                    serializer=None,
                )
        wait_for(lambda: reasons().get("undecodable") == 21, timeout=60, message="21 bad")
    finally:
        proc.stop()
    log = proc.output()
    assert log.count("malformed event skipped (undecodable)") == 1
    assert "Traceback" not in log


def test_two_collectors_share_a_rabbitmq_queue_and_survive_kill_9(
    amqp_url: str, server: RedisServer, tmp_path: Path
) -> None:
    redis_url = f"redis://127.0.0.1:{server.port}/1"
    keys = Keys("faults")
    r = redis.Redis.from_url(redis_url)
    queue = "pollen-faults-shared"
    settings = {"event_queue": queue, "batch_size": "200"}
    a = collector(amqp_url, redis_url, tmp_path / "a.log", **settings)
    b = collector(amqp_url, redis_url, tmp_path / "b.log", **settings)
    # the no-fault run: the same events through a queue of its own, into another namespace
    ref = collector(
        amqp_url, redis_url, tmp_path / "ref.log", "ref", event_queue="pollen-faults-ref"
    )
    tasks, seed = 6000, 11
    sent: list[int] = []
    restarted: list[Process] = []
    try:
        wait_listening(r, keys, 2)
        wait_listening(r, REF)
        sender = threading.Thread(
            target=lambda: sent.append(publish_mixed(amqp_url, tasks, seed, per_second=2000.0))
        )
        sender.start()
        wait_for(lambda: applied_events(r, keys) > 10000, timeout=30, message="events flowing")
        # both consumers have reported applied events before one is killed: a collector writes
        # its figures once a second and kill -9 loses what it had not written yet, so without
        # this "both collectors took part" below would depend on when the kill falls
        wait_for(
            lambda: all(reported_events(r, keys, p) > 0 for p in (a, b)),
            timeout=60,
            message="both collectors reporting applied events",
        )
        a.signal(signal.SIGKILL)
        a.proc.wait(10)
        # a moment with one consumer fewer (b takes over a's unacknowledged events); what is
        # checked holds for any length of it
        time.sleep(0.5)
        restarted.append(collector(amqp_url, redis_url, tmp_path / "a2.log", **settings))
        sender.join(120)
        assert sent, "the publisher failed"
        total = sent[0]
        for k in (keys, REF):
            wait_for(
                applied_at_least(r, k, total),
                timeout=60,
                message=f"{total} events applied in {k.namespace}",
            )
        # no event applied twice: once both queues are drained (nothing ready, nothing
        # unacknowledged) no redelivery is left to arrive, so the counts are final
        vhost = amqp_url.rsplit("/", 1)[1]
        for name in (queue, "pollen-faults-ref"):
            wait_for(
                partial(queue_drained, vhost, name),
                timeout=60,
                interval=0.5,
                message=f"queue {name} drained",
            )
        assert applied_events(r, keys) == total
        shard = keys.all_shards[0]
        assert r.zcard(shard.by_timestamp) == tasks
        assert r.zcard(shard.by_state("SUCCESS")) == successes(tasks, seed)
        # both collectors took part
        totals = [
            int(r.hget(keys.collector(cid.decode()), "events_total") or 0)
            for cid in raw_list(r.zrange(keys.collectors, 0, -1))
        ]
        assert sum(1 for t in totals if t > 0) >= 2
        # every task, index, counter and stream event equals the no-fault run's (a redelivered
        # event that reaches Redis before its task's name is moved under the name later)
        assert assert_same_state(r, "faults", r, "ref") > tasks
    finally:
        for p in (a, b, ref, *restarted):
            p.stop()


def test_redis_broker_collectors_restart_in_turn_without_loss(
    server: RedisServer, tmp_path: Path
) -> None:
    broker_url, redis_url = server.url, f"redis://127.0.0.1:{server.port}/1"
    keys = Keys("faults")
    r = redis.Redis.from_url(redis_url)
    a = collector(broker_url, redis_url, tmp_path / "a.log")
    b = collector(broker_url, redis_url, tmp_path / "b.log")
    # the no-fault run: a third listener on the same pub/sub, into another namespace
    ref = collector(broker_url, redis_url, tmp_path / "ref.log", "ref")
    procs = [a, b, ref]
    tasks, seed = 4000, 12
    sent: list[int] = []
    try:
        wait_subscribed(r, 3)
        sender = threading.Thread(
            target=lambda: sent.append(publish_mixed(broker_url, tasks, seed, per_second=1000.0))
        )
        sender.start()
        wait_for(lambda: applied_events(r, keys) > 5000, timeout=30, message="events flowing")
        # restart one, then the other, while events keep coming
        a.stop()
        # a's subscription is gone before a2 is counted: Redis may see a's socket close after
        # a has exited, and a count of three that still held a would let b stop too early
        wait_subscribed(r, 2)
        a2 = collector(broker_url, redis_url, tmp_path / "a2.log")
        procs.append(a2)
        wait_subscribed(r, 3)  # b, ref and a2
        b.stop()
        procs.append(collector(broker_url, redis_url, tmp_path / "b2.log"))
        sender.join(60)
        assert sent, "the publisher failed"
        total = sent[0]
        for k in (keys, REF):
            wait_for(
                applied_at_least(r, k, total),
                timeout=60,
                message=f"every event applied in {k.namespace}",
            )
        # a fixed wait, to prove an absence: a duplicate that was not recognised would arrive
        # after the count reached the total, and pub/sub leaves no state to poll that says
        # none is left. A slow machine can only make this pass, never fail, wrongly
        time.sleep(1.0)
        assert applied_events(r, keys) == total
        assert r.zcard(keys.all_shards[0].by_state("SUCCESS")) == successes(tasks, seed)
        dup = sum(
            int(r.hget(keys.collector(c.decode()), "duplicates_total") or 0)
            for c in raw_list(r.zrange(keys.collectors, 0, -1))
        )
        assert dup > 0  # both listened: the second copy of each event was recognised
        assert assert_same_state(r, "faults", r, "ref") > tasks
    finally:
        for p in procs:
            p.stop()
