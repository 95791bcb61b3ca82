"""Retention: evicting a task removes its hash and every index entry together."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import redis

from services.collector.writer import Writer
from shared.keys import Keys
from shared.settings import Settings, SettingsError, load
from tests.support import readback
from tests.support.replies import raw_list, raw_set

T0 = 1_790_000_000.0


def lifecycle(
    uuid: str,
    ts: float,
    outcome: str = "succeeded",
    parent: str | None = None,
    worker: str = "w@h",
    name: str = "t.x",
) -> list[dict[str, Any]]:
    end: dict[str, Any] = {
        "type": f"task-{outcome}",
        "uuid": uuid,
        "hostname": worker,
        "timestamp": ts + 2,
        "clock": 3,
    }
    if outcome == "failed":
        end.update(exception="E()", traceback="tb")
    return [
        {
            "type": "task-received",
            "uuid": uuid,
            "hostname": worker,
            "timestamp": ts,
            "clock": 1,
            "name": name,
            "args": "()",
            "kwargs": "{}",
            "parent_id": parent,
            "root_id": parent,
        },
        {"type": "task-started", "uuid": uuid, "hostname": worker, "timestamp": ts + 1, "clock": 2},
        end,
    ]


def all_members(r: redis.Redis, keys: Keys) -> set[bytes]:
    """Every uuid mentioned in any index or children set."""
    out: set[bytes] = set()
    for shard in keys.all_shards:
        for key in r.scan_iter(match=shard.prefix + "idx:*"):
            out.update(raw_list(r.zrange(key, 0, -1)))
        for key in r.scan_iter(match=shard.prefix + "children:*"):
            out.update(raw_set(r.smembers(key)))
    return out


def task_keys(r: redis.Redis, keys: Keys) -> set[bytes]:
    return {k for s in keys.all_shards for k in r.scan_iter(match=s.prefix + "task:*")}


def test_count_cap_evicts_oldest_with_every_index_entry(r: redis.Redis, settings: Settings) -> None:
    writer = Writer(r, msgspec.structs.replace(settings, max_tasks=10))
    events = []
    for i in range(25):
        events += lifecycle(
            f"t{i:02d}",
            T0 + i * 10,
            "failed" if i % 3 == 0 else "succeeded",
            parent="t00" if i else None,
        )
    readback.apply(writer, events)
    kept = {f"t{i:02d}".encode() for i in range(15, 25)}
    assert all_members(r, writer.keys) == kept
    assert {k.rsplit(b":", 1)[1] for k in task_keys(r, writer.keys)} == kept


def test_age_limits_with_longer_retention_for_failures(r: redis.Redis, settings: Settings) -> None:
    writer = Writer(r, msgspec.structs.replace(settings, task_ttl=100, failed_task_ttl=1000))
    events = (
        lifecycle("old-ok", T0)
        + lifecycle("old-failed", T0, "failed")
        + lifecycle("older-failed", T0 - 2000, "failed")
        + lifecycle("new-ok", T0 + 500)
    )
    readback.apply(writer, events)
    result = writer.apply([], now=T0 + 600, age_check=True)
    assert result.evicted == 2
    remaining = {k.rsplit(b":", 1)[1] for k in task_keys(r, writer.keys)}
    assert remaining == {b"old-failed", b"new-ok"}
    assert all_members(r, writer.keys) == remaining
    assert readback.task(r, writer.keys, "old-failed") is not None


def test_zero_ttl_keeps_tasks(r: redis.Redis, settings: Settings) -> None:
    writer = Writer(r, msgspec.structs.replace(settings, task_ttl=0, failed_task_ttl=0))
    readback.apply(writer, lifecycle("ancient", 1000.0))
    assert writer.apply([], now=T0, age_check=True).evicted == 0
    assert readback.task(r, writer.keys, "ancient") is not None


def test_retention_by_task_name(r: redis.Redis, settings: Settings) -> None:
    rules = "chatty.*=success:0,billing.*=failure:forever,reports.?=all:10,*=REVOKED:5"
    writer = Writer(
        r,
        msgspec.structs.replace(settings, task_ttl=100, failed_task_ttl=1000, task_retention=rules),
    )
    now = T0 + 50
    events = (
        # successes of chatty tasks are not kept, however new; its failures by the defaults
        lifecycle("chatty-ok", now - 3, name="chatty.ping")
        + lifecycle("chatty-failed", now - 500, "failed", name="chatty.ping")
        # billing failures are kept forever, its successes by the default
        + lifecycle("billing-failed", now - 90_000, "failed", name="billing.charge")
        + lifecycle("billing-ok", now - 200, name="billing.charge")
        # reports.a: everything for 10 s; reports.ab does not match reports.?
        + lifecycle("reports-ok", now - 20, name="reports.a")
        + lifecycle("reports-long", now - 20, name="reports.ab")
        # the default for other names and states
        + lifecycle("other-ok", now - 50, name="other.task")
        + lifecycle("other-failed", now - 2000, "failed", name="other.task")
        # no task-received seen: no name; aged by its state's limit all the same
        + lifecycle("nameless-failed", now - 2000, "failed")[1:]
        + lifecycle("nameless-new", now - 10, "failed")[1:]
    )
    readback.apply(writer, events)
    writer.apply([], now=now, age_check=True)
    remaining = {k.rsplit(b":", 1)[1].decode() for k in task_keys(r, writer.keys)}
    assert remaining == {
        "chatty-failed",
        "billing-failed",
        "reports-long",
        "other-ok",
        "nameless-new",
    }
    assert {m.decode() for m in all_members(r, writer.keys)} == remaining


def test_bad_retention_rules_stop_the_service() -> None:
    for bad in (
        "billing.*",
        "x=success",
        "x=later:1d",
        "x=success:1w",
        "x=success:-1",
        "[ab]=all:1",
    ):
        with pytest.raises(SettingsError, match="POLLEN_TASK_RETENTION"):
            load({"POLLEN_TASK_RETENTION": bad})
