"""Lost tasks: the mark is the lost rule over celery's answer, whatever the order.

A task is lost while celery says it is RECEIVED or STARTED, on a worker that died (a death
the enabler recorded) no earlier than the task's newest event; ``lost_at`` is the first such
death. Hypothesis draws event streams and deaths, and applies them in emission order and
in random orders with the deaths anywhere among the events: the marks, the ``lost`` index,
the counts and the ``task-lost`` announcements must all agree with that rule.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
import redis
from celery import states
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.collector.writer import Writer
from shared.keys import SEP, Keys
from shared.settings import Settings
from tests.collector.test_oracle import celery_answer, celery_task
from tests.support import readback
from tests.support.lifecycles import BASE_TS, WORKERS, chunks, cluster_stream, with_local_received
from tests.support.replies import entries

COMMON = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Death = tuple[str, float]


@st.composite
def deaths_of(draw: st.DrawFn, events: list[dict[str, Any]]) -> list[Death]:
    """Deaths of the stream's workers: at an event's time (the rule's edge) or anywhere."""
    stamps = [e["timestamp"] for e in events]
    span = (min(stamps), max(stamps) + 5)
    when = st.one_of(st.sampled_from(stamps), st.floats(*span).map(lambda t: round(t, 6)))
    return draw(st.lists(st.tuples(st.sampled_from(WORKERS), when), max_size=3))


def expected(events: list[dict[str, Any]], deaths: list[Death]) -> dict[str, tuple[float, str]]:
    """uuid -> (lost_at, worker) by the lost rule over celery's State."""
    newest: dict[str, float] = {}
    for e in events:
        if "uuid" in e:
            newest[e["uuid"]] = max(newest.get(e["uuid"], BASE_TS), e["timestamp"])
    out = {}
    for uuid, task in celery_answer(events).tasks.items():
        host = task.worker.hostname if task.worker is not None else None
        if host is None or task.state not in (states.RECEIVED, states.STARTED):
            continue
        later = sorted(d for h, d in deaths if h == host and d >= newest[uuid])
        if later:
            out[uuid] = (later[0], host)
    return out


def check(r: redis.Redis, keys: Keys, events: list[dict[str, Any]], deaths: list[Death]) -> None:
    want = expected(events, deaths)
    assert readback.lost_tasks(r, keys) == {u: at for u, (at, _) in want.items()}
    tasks = celery_answer(events).tasks
    counts: dict[str, int] = {}
    for uuid, (_, host) in want.items():
        field = f"{host}{SEP}{tasks[uuid].name or ''}"
        counts[field] = counts.get(field, 0) + 1
    assert readback.lost_counts(r, keys) == counts
    for uuid, task in tasks.items():
        ours = readback.task(r, keys, uuid)
        assert ours is not None
        lost = ours.pop("lost", None), ours.pop("lost_at", None)
        assert lost == ((True, want[uuid][0]) if uuid in want else (None, None))
        assert ours == celery_task(task)
    # the last announcement of each task says what its mark is now
    last: dict[str, bool] = {}
    for shard in keys.all_shards:
        for _, fields in entries(r.xrange(shard.stream)):
            event = json.loads(fields[b"e"])
            if event["type"] == "task-lost":
                last[event["uuid"]] = event["lost"]
    assert {u for u, lost in last.items() if lost} == set(want)


@pytest.fixture(params=[1, 3], ids=["1-shard", "3-shards"])
def settings_(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, shards=request.param)


def play(writer: Writer, ops: list[Any], sizes: list[int]) -> None:
    """Apply events in batches of ``sizes``, a death where the list holds one."""
    run: list[dict[str, Any]] = []
    for op in [*ops, None]:
        if isinstance(op, dict):
            run.append(op)
            continue
        for chunk in chunks(run, sizes):
            readback.apply(writer, chunk)
        run = []
        if op is not None:
            readback.death(writer, *op)


@COMMON
@given(events=cluster_stream(), data=st.data())
def test_in_order_with_deaths_after(
    r: redis.Redis, settings_: Settings, events: list[dict[str, Any]], data: st.DataObject
) -> None:
    r.flushall()
    writer = Writer(r, settings_)
    deaths = data.draw(deaths_of(events))
    play(writer, [*with_local_received(events), *deaths], [5])
    check(r, writer.keys, events, deaths)


@COMMON
@given(events=cluster_stream(), data=st.data())
def test_any_order_of_events_and_deaths_converges(
    r: redis.Redis, settings_: Settings, events: list[dict[str, Any]], data: st.DataObject
) -> None:
    r.flushall()
    writer = Writer(r, settings_)
    deaths = data.draw(deaths_of(events))
    ops: list[Any] = data.draw(st.permutations([*with_local_received(events), *deaths]))
    play(writer, ops, data.draw(st.lists(st.integers(1, 8), max_size=3)))
    check(r, writer.keys, events, deaths)
    # a death recorded twice changes nothing
    for death in deaths:
        readback.death(writer, *death)
    check(r, writer.keys, events, deaths)


def test_a_later_event_clears_the_mark_and_eviction_takes_it_back(
    r: redis.Redis, settings: Settings
) -> None:
    writer = Writer(r, msgspec.structs.replace(settings, max_tasks=1))
    base = {"uuid": "u-1", "clock": 1, "pid": 1, "utcoffset": 0}
    received = {**base, "type": "task-received", "hostname": "w@dead", "timestamp": BASE_TS,
                "name": "t.x", "retries": 0}  # fmt: skip
    readback.apply(writer, with_local_received([received]))
    readback.death(writer, "w@dead", BASE_TS + 1)
    assert readback.lost_tasks(r, writer.keys) == {"u-1": BASE_TS + 1}
    assert readback.lost_counts(r, writer.keys) == {f"w@dead{SEP}t.x": 1}
    # redelivered: another worker receives it
    again = {**received, "hostname": "w@live", "timestamp": BASE_TS + 2, "clock": 2}
    readback.apply(writer, with_local_received([again]))
    assert readback.lost_tasks(r, writer.keys) == {}
    assert readback.lost_counts(r, writer.keys) == {}
    # that worker dies too, then the task is evicted by a newer one: its count goes with it
    readback.death(writer, "w@live", BASE_TS + 3)
    assert readback.lost_counts(r, writer.keys) == {f"w@live{SEP}t.x": 1}
    other = {**received, "uuid": "u-2", "hostname": "w@live", "timestamp": BASE_TS + 4}
    readback.apply(writer, with_local_received([other]))
    assert readback.task(r, writer.keys, "u-1") is None
    assert readback.lost_tasks(r, writer.keys) == {}
    assert readback.lost_counts(r, writer.keys) == {}
