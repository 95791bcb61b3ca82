"""Celery is the oracle: Pollen's Redis state equals celery.events.state.State's.

Hypothesis generates realistic event streams; they go to celery's State in emission order,
and to Pollen in that order, in random batches, and in random permutations (as two
collectors or redeliveries produce). Every task field and every worker field must match.
"""

from __future__ import annotations

import bisect
from typing import Any

import msgspec
import pytest
import redis
from celery.events.state import State, Task, Worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.collector.writer import Writer
from shared import events as ev
from shared.events import TASK_FIELDS, WORKER_EVENT_FIELDS
from shared.keys import SEP, WAIT_BUCKETS, Keys
from shared.settings import Settings
from tests.support import readback
from tests.support.lifecycles import BASE_TS, chunks, cluster_stream, with_local_received
from tests.support.replies import raw_hash, scored

# the fields celery's own Worker and Task define, so a field Pollen forgets cannot pass
WORKER_FIELDS = tuple(f for f in Worker._fields if f != "heartbeats")


def test_task_fields_are_celerys() -> None:
    assert Task._fields == TASK_FIELDS
    assert set(WORKER_EVENT_FIELDS) == set(WORKER_FIELDS)


def celery_answer(events: list[dict[str, Any]]) -> State:
    state = State()
    for event in with_local_received(events):
        state.event(dict(event))
    return state


def celery_task(task: Any) -> dict[str, Any]:
    d: dict[str, Any] = task.as_dict()
    d["worker"] = task.worker.hostname if task.worker is not None else None
    d["children"] = sorted(d["children"])
    return d


def assert_same(r: redis.Redis, keys: Keys, state: State, label: str) -> None:
    for uuid, task in state.tasks.items():
        ours = readback.task(r, keys, uuid)
        assert ours == celery_task(task), f"{label}: task {uuid} differs"
    probes = [BASE_TS + d for d in (0, 5, 30, 60, 200, 1000)]
    for hostname, worker in state.workers.items():
        last_event_time = max([*worker.heartbeats, BASE_TS])
        for now in [
            *probes,
            last_event_time + 1,
            last_event_time + 3.9,
            last_event_time + 4.1,
            last_event_time + 119,
        ]:
            ours = readback.worker(r, keys, hostname, now)
            expected_alive = bool(worker.heartbeats) and now < worker.heartbeat_expires
            assert ours["alive"] == expected_alive, f"{label}: {hostname} alive at {now}"
        ours = readback.worker(r, keys, hostname, BASE_TS)
        for field in WORKER_FIELDS:
            assert ours[field] == getattr(worker, field), f"{label}: {hostname}.{field}"
    assert readback.task_names(r, keys) == state.task_types()


@pytest.fixture(params=[1, 3], ids=["1-shard", "3-shards"])
def settings_(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, shards=request.param)


def counters(r: redis.Redis, keys: Keys) -> dict[str, dict[bytes, bytes]]:
    """Every counter hash of a namespace (counts, runtime, per-minute, failures), summed over
    shards, Flower's prefetch time per worker and name (the latest over the shards), and the
    exception classes' first and last times and task indexes."""
    out: dict[str, dict[bytes, bytes]] = {}
    # sums over the shards, rounded once at the end (rounding each partial sum can move the
    # 6th decimal of the total)
    sums: dict[str, dict[bytes, float]] = {}
    for shard in keys.all_shards:
        for key in r.scan_iter(match=shard.prefix + "*"):
            kind = key.decode()[len(shard.prefix) :]
            if kind == "prefetch":
                latest = out.setdefault(kind, {})
                for field, value in raw_hash(r.hgetall(key)).items():
                    ts, uuid, _ = value.split(b",")
                    if field not in latest or (float(ts), uuid) > (
                        float(latest[field].split(b",")[0]),
                        latest[field].split(b",")[1],
                    ):
                        latest[field] = value
            elif kind in ("counts", "runtime", "failures", "wait") or kind.startswith(
                ("minute:", "failminute:", "rtminute:", "wtminute:")
            ):
                summed = sums.setdefault(kind, {})
                for field, value in raw_hash(r.hgetall(key)).items():
                    summed[field] = summed.get(field, 0.0) + float(value)
            elif kind in ("failfirst", "faillast") or kind.startswith("idx:exc:"):
                # first seen: the earliest over the shards; last seen, an index: the latest
                pick = min if kind == "failfirst" else max
                merged = out.setdefault(kind, {})
                for member, score in scored(r.zrange(key, 0, -1, withscores=True)):
                    old = merged.get(member)
                    merged[member] = repr(pick(score, float(old)) if old else score).encode()
    for kind, summed in sums.items():
        out[kind] = {field: repr(round(total, 6)).encode() for field, total in summed.items()}
    return out


def celery_waits(events: list[dict[str, Any]]) -> dict[str, dict[bytes, bytes]]:
    """The wait histograms as celery's State gives them, replayed in order: a task-received's
    queue wait from the task-sent of its retries (celery's ``sent``, ``received``, ``eta``), a
    task-started's prefetch wait from the received before it; each from the due time (or the
    eta when later), at least 0, labelled by the task's final queue (routing key) and name."""
    state = State()
    sent: dict[tuple[str, int], float] = {}
    pending: dict[str, tuple[float, float | None]] = {}
    found: list[tuple[str, str, float, float]] = []
    for event in with_local_received(events):
        state.event(dict(event))
        kind, uuid = event["type"], event.get("uuid")
        if uuid is None:
            continue
        task = state.tasks[uuid]
        eta = ev.eta_timestamp(task.eta)
        if kind == "task-sent":
            sent.setdefault((uuid, event["retries"]), task.sent)
        elif kind == "task-received":
            pending[uuid] = (task.received, eta)
            if (uuid, event["retries"]) in sent:
                due = max(sent[(uuid, event["retries"])], eta or 0)
                found.append((uuid, "queue", task.received - due, task.received))
        elif kind == "task-started" and uuid in pending:
            received, eta = pending.pop(uuid)
            found.append((uuid, "prefetch", task.started - max(received, eta or 0), task.started))
    out: dict[str, dict[bytes, float]] = {}
    for uuid, stage, seconds, ts in found:
        task = state.tasks[uuid]
        seconds = max(0.0, seconds)
        i = bisect.bisect_left(WAIT_BUCKETS, seconds)
        bucket = repr(WAIT_BUCKETS[i]) if i < len(WAIT_BUCKETS) else "+Inf"
        field = SEP.join([stage, task.routing_key or "", task.name or "", ""])
        for kind, name, value in [
            ("wait", bucket, 1.0),
            ("wait", "sum", seconds),
            (f"wtminute:{int(ts // 60)}", bucket, 1.0),
        ]:
            fields = out.setdefault(kind, {})
            key = (field + name).encode()
            fields[key] = fields.get(key, 0.0) + value
    return {
        kind: {k: repr(round(v, 6)).encode() for k, v in fields.items() if round(v, 6)}
        for kind, fields in out.items()
    }


def waits(r: redis.Redis, keys: Keys) -> dict[str, dict[bytes, bytes]]:
    return {k: v for k, v in counters(r, keys).items() if k == "wait" or k.startswith("wtminute:")}


COMMON = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@COMMON
@given(events=cluster_stream(), sizes=st.lists(st.integers(1, 8), max_size=4))
def test_in_order_matches_celery(
    r: redis.Redis, settings_: Settings, events: list[dict[str, Any]], sizes: list[int]
) -> None:
    r.flushall()
    writer = Writer(r, settings_)
    for chunk in chunks(with_local_received(events), sizes):
        readback.apply(writer, chunk)
    assert_same(r, writer.keys, celery_answer(events), "in order")
    assert waits(r, writer.keys) == celery_waits(events)


@COMMON
@given(events=cluster_stream(), data=st.data())
def test_any_arrival_order_converges(
    r: redis.Redis, settings_: Settings, events: list[dict[str, Any]], data: st.DataObject
) -> None:
    r.flushall()
    writer = Writer(r, settings_)
    shuffled = data.draw(st.permutations(with_local_received(events)))
    for chunk in chunks(shuffled, data.draw(st.lists(st.integers(1, 8), max_size=3))):
        readback.apply(writer, chunk)
    assert_same(r, writer.keys, celery_answer(events), "permuted")
    # counters too: an event counted before its task's name arrived is moved under the name
    in_order = Writer(r, msgspec.structs.replace(settings_, namespace="inorder"))
    readback.apply(in_order, with_local_received(events))
    assert counters(r, writer.keys) == counters(r, in_order.keys)


@COMMON
@given(events=cluster_stream(), data=st.data())
def test_duplicates_change_nothing(
    r: redis.Redis, settings_: Settings, events: list[dict[str, Any]], data: st.DataObject
) -> None:
    """Two collectors on a Redis broker both apply every event: state and counters unchanged."""
    r.flushall()
    writer = Writer(r, settings_)
    readback.apply(writer, with_local_received(events))
    counts = {shard.index: r.hgetall(shard.counts) for shard in writer.keys.all_shards}
    stream_len = sum(r.xlen(shard.stream) for shard in writer.keys.all_shards)
    again = data.draw(
        st.lists(st.sampled_from(with_local_received(events)), min_size=1, max_size=len(events))
    )
    result = readback.apply(writer, again)
    assert result.applied == 0 and result.duplicates == len(again)
    assert {shard.index: r.hgetall(shard.counts) for shard in writer.keys.all_shards} == counts
    assert sum(r.xlen(shard.stream) for shard in writer.keys.all_shards) == stream_len
    assert_same(r, writer.keys, celery_answer(events), "duplicated")
