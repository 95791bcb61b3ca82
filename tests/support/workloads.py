"""Workloads and their comparison: a varied event stream published through celery's own
EventDispatcher, and a full snapshot of a namespace's state for comparing a faulty run with a
no-fault run of the same stream."""

from __future__ import annotations

import json
import math
import random
import time
import uuid as uuidlib
from collections import Counter
from typing import Any

import redis
from celery import Celery

from shared.keys import Keys
from tests.support.replies import entries, raw_hash, raw_set, scored, text
from tests.support.servers import rabbitmqctl

# --- a varied stream -------------------------------------------------------------------------

#: What happens to each task of ``publish_mixed`` (weights): every state a task can end in,
#: and tasks left unfinished.
OUTCOMES = (
    ("success", 6),
    ("failure", 2),
    ("retry", 1),
    ("revoked", 1),
    ("progress", 1),
    ("started", 1),
    ("received", 1),
    ("rejected", 1),
)
MIXED_WORKERS = ("w1@faults", "w2@faults")
MIXED_CLIENT = "client@faults"


def mixed_plan(count: int, seed: int) -> list[tuple[str, str, str]]:
    """``(uuid, outcome, worker)`` per task, the same for the same ``count`` and ``seed``."""
    rng = random.Random(seed)
    kinds = [k for k, w in OUTCOMES for _ in range(w)]
    return [
        (
            str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
            rng.choice(kinds),
            rng.choice(MIXED_WORKERS),
        )
        for _ in range(count)
    ]


def _task_events(i: int, uuid: str, outcome: str) -> list[tuple[str, dict[str, Any]]]:
    """A task's events after task-sent: ``(type, fields)`` in emission order."""
    name = f"faults.task{i % 7}"
    out: list[tuple[str, dict[str, Any]]] = [
        (
            "task-received",
            {
                "uuid": uuid,
                "name": name,
                "args": f"({i},)",
                "kwargs": "{}",
                "retries": 0,
                "eta": None,
                "expires": None,
                "root_id": uuid,
                "parent_id": None,
            },
        )
    ]
    if outcome == "received":
        return out
    if outcome == "rejected":
        return [*out, ("task-rejected", {"uuid": uuid, "requeue": False})]
    if outcome == "revoked":
        revoked = {"uuid": uuid, "terminated": False, "signum": None, "expired": False}
        return [*out, ("task-revoked", revoked)]
    out.append(("task-started", {"uuid": uuid}))
    if outcome == "started":
        return out
    if outcome == "progress":
        out.append(("task-progress", {"uuid": uuid, "result": "50%"}))
    if outcome == "retry":
        retried = {"uuid": uuid, "exception": "Retry('later')", "traceback": "Traceback ..."}
        out.append(("task-retried", retried))
        out.append(("task-received", {**out[0][1], "retries": 1}))
        out.append(("task-started", {"uuid": uuid}))
    if outcome == "failure":
        failed = {"uuid": uuid, "exception": "ValueError('boom')", "traceback": "Traceback ..."}
        out.append(("task-failed", failed))
    else:
        runtime = 0.001 * (i % 997)
        out.append(("task-succeeded", {"uuid": uuid, "result": str(i), "runtime": runtime}))
    return out


def publish_mixed(
    broker_url: str, count: int, seed: int = 1, per_second: float | None = None, start: int = 0
) -> int:
    """Publish ``count`` tasks of ``mixed_plan(start + count, seed)[start:]`` (task-sent from a
    client, the rest from two workers, worker heartbeats in between) through celery's
    EventDispatcher, as clients and workers do; returns the number of events sent."""
    plan = mixed_plan(start + count, seed)[start:]
    app = Celery(broker=broker_url)
    sent = 0
    began = time.monotonic()
    with app.connection_for_write() as conn:
        buffered = {"buffer_group": ["task"], "buffer_limit": 24}
        client = app.events.Dispatcher(conn, hostname=MIXED_CLIENT, enabled=True, **buffered)
        workers = {
            h: app.events.Dispatcher(conn, hostname=h, enabled=True, **buffered)
            for h in MIXED_WORKERS
        }
        for n, (uuid, outcome, worker) in enumerate(plan):
            i = start + n
            client.send(
                "task-sent",
                uuid=uuid,
                name=f"faults.task{i % 7}",
                args=f"({i},)",
                kwargs="{}",
                retries=0,
                eta=None,
                expires=None,
                queue="celery",
                exchange="",
                routing_key="celery",
                root_id=uuid,
                parent_id=None,
            )
            sent += 1
            for kind, fields in _task_events(i, uuid, outcome):
                workers[worker].send(kind, **fields)
                sent += 1
            if n % 100 == 99:
                for dispatcher in workers.values():
                    dispatcher.flush()
                    dispatcher.send(
                        "worker-heartbeat",
                        freq=2.0,
                        active=i % 4,
                        processed=i,
                        loadavg=[0.5, 0.25, 0.1],
                        sw_ident="py-celery",
                        sw_ver="5.7.0",
                        sw_sys="Linux",
                    )
                    sent += 1
            if per_second and n % 50 == 0:
                ahead = (n / per_second) - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        for dispatcher in (client, *workers.values()):
            dispatcher.flush()
            dispatcher.close()
    return sent


# --- state snapshots -------------------------------------------------------------------------

#: Global keys that describe the collectors themselves, not the Celery cluster.
_OWN_KEYS = ("collector:", "collectors", "malformed")


def applied_events(r: redis.Redis, keys: Keys) -> int:
    """Events applied (Flower's event counter, summed)."""
    return sum(int(v) for shard in keys.all_shards for v in r.hvals(shard.counts))


def queue_drained(vhost: str, queue: str) -> bool:
    """Nothing ready and nothing unacknowledged in a collector's queue on the shared RabbitMQ.

    A collector acknowledges a batch only after committing it, and RabbitMQ requeues what a
    dead consumer left unacknowledged: once the queue is drained (after the publisher is done)
    every event has been applied or found a duplicate, and nothing more can arrive. This is
    the positive state that proves "no event is applied twice", in place of a fixed wait."""
    out = rabbitmqctl(
        "list_queues",
        "-p",
        vhost,
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    )
    for line in out.stdout.splitlines():
        name, *counts = line.split("\t")
        if name == queue:
            return counts == ["0", "0"]
    raise AssertionError(f"no queue {queue!r} in vhost {vhost!r}: {out.stdout}{out.stderr}")


def snapshot(r: redis.Redis, namespace: str) -> dict[str, Any]:
    """Every key of ``namespace`` with its full value, keyed by its name without the
    namespace, leaving out only what depends on when or by whom an event was received: the
    collectors' own health, heartbeat receive times (``_hb`` and the ``workers`` scores) and
    stream entry ids (the stream is compared as the multiset of its events' identities)."""
    shard_prefix = f"{namespace}:{{{namespace}}}:"
    out: dict[str, Any] = {}
    for raw in r.scan_iter(match=f"{namespace}:*", count=1000):
        key = raw.decode()
        if key.startswith(shard_prefix):
            rel = "S:" + key[len(shard_prefix) :]
        else:
            rel = key[len(namespace) + 1 :]
            if rel.startswith(_OWN_KEYS):
                continue
        kind = text(r.type(key))
        value: Any
        if kind == "hash":
            h = {k.decode(): v.decode() for k, v in raw_hash(r.hgetall(key)).items()}
            h.pop("_hb", None)
            if rel in ("S:runtime", "S:wait"):
                # float sums added in a different order differ in their last bits
                h = {k: (_rounded(v) if k.endswith("\x1fsum") else v) for k, v in h.items()}
            value = h
        elif kind == "zset":
            pairs = scored(r.zrange(key, 0, -1, withscores=True))
            if rel in ("S:workers",) or rel.startswith("S:wdedup:"):
                value = sorted(m.decode() for m, _ in pairs)
            else:
                value = {m.decode(): s for m, s in pairs}
        elif kind == "set" and rel == "S:states":
            # states seen, transient ones included (a task-rejected redelivered ahead of its
            # task-received makes the task REJECTED for a moment): compare those with tasks
            value = sorted(
                m.decode()
                for m in raw_set(r.smembers(key))
                if r.zcard(f"{shard_prefix}idx:state:{m.decode()}")
            )
        elif kind == "set":
            value = sorted(m.decode() for m in raw_set(r.smembers(key)))
        elif kind == "stream":
            value = stream_identities(r, key)
        elif kind == "string":
            value = r.get(key)
        else:
            value = kind
        out[rel] = value
    return out


def _rounded(text: str) -> str:
    value = float(text)
    return text if not math.isfinite(value) else f"{value:.6f}"


def stream_identities(r: redis.Redis, key: str) -> Counter[tuple[Any, ...]]:
    """The stream's events as ``(type, uuid, hostname, timestamp, clock)`` with counts."""
    found: Counter[tuple[Any, ...]] = Counter()
    last = "-"
    while True:
        batch = entries(r.xrange(key, min=last, count=5000))
        if last != "-":
            batch = batch[1:]
        if not batch:
            return found
        for _sid, fields in batch:
            e = json.loads(fields[b"e"])
            found[(e["type"], e.get("uuid"), e["hostname"], e["timestamp"], e.get("clock"))] += 1
        last = batch[-1][0].decode()


def differences(a: dict[str, Any], b: dict[str, Any], limit: int = 8) -> list[str]:
    """Readable differences between two snapshots (empty when equal)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            left, right = a.get(key, "<absent>"), b.get(key, "<absent>")
            if isinstance(left, dict) and isinstance(right, dict):
                fields = sorted(k for k in set(left) | set(right) if left.get(k) != right.get(k))[
                    :5
                ]
                detail = {f: (left.get(f), right.get(f)) for f in fields}
                out.append(f"{key}: {detail}")
            else:
                out.append(f"{key}: {str(left)[:200]} != {str(right)[:200]}")
            if len(out) >= limit:
                break
    return out


def assert_same_state(
    faulty: redis.Redis,
    faulty_ns: str,
    reference: redis.Redis,
    reference_ns: str,
) -> int:
    """The faulty run's state equals the no-fault run's, key by key; returns the key count."""
    a = snapshot(faulty, faulty_ns)
    b = snapshot(reference, reference_ns)
    diff = differences(a, b)
    assert not diff, "state differs from the no-fault run:\n" + "\n".join(diff)
    return len(a)
