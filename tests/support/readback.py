"""Read Pollen's state back from Redis into plain dicts, for comparing with celery's State."""

from __future__ import annotations

import json
from typing import Any

import redis

from services.collector.decode import Decoded, Decoder
from services.collector.writer import Applied, Writer
from shared import apply_events, readers
from shared.keys import Keys
from shared.redaction import Redactor
from tests.support.replies import raw_hash, raw_list, raw_set


def decode_events(
    events: list[dict[str, Any]], max_field_bytes: int = 32768, redactor: Redactor | None = None
) -> list[Decoded]:
    """Decode dict events the way the collector decodes message bodies (one body each); the
    collector's receive time is the event's ``local_received`` when it has one."""
    decoder = Decoder(max_field_bytes, redactor)
    out: list[Decoded] = []
    for event in events:
        body = dict(event)
        local_received = body.pop("local_received", event["timestamp"])
        result = decoder.decode(
            json.dumps(body).encode(), "application/json", "utf-8", local_received
        )
        assert not result.bad, result.bad
        out.extend(result.events)
    return out


def apply(writer: Writer, events: list[dict[str, Any]], now: float = 0.0) -> Applied:
    """Decode and apply ``events`` as the collector would with ``writer``'s settings."""
    s = writer.settings
    redactor = Redactor.from_settings(s.redact_keys, s.redact_fields)
    return writer.apply(decode_events(events, s.max_field_bytes, redactor), now)


def task(r: redis.Redis, keys: Keys, uuid: str) -> dict[str, Any] | None:
    h = raw_hash(r.hgetall(keys.shard_for(uuid).task(uuid)))
    if not h:
        return None
    children: set[str] = set()
    for shard in keys.all_shards:
        children.update(m.decode() for m in raw_set(r.smembers(shard.children(uuid))))
    return readers.task_from_hash(h, children)


def worker(r: redis.Redis, keys: Keys, hostname: str, now: float) -> dict[str, Any]:
    h = raw_hash(r.hgetall(keys.shard_for(hostname).worker(hostname)))
    seen = [r.zscore(shard.seen, hostname) for shard in keys.all_shards]
    task_seen = max((s for s in seen if s is not None), default=None)
    return readers.worker_from_hash(hostname, h, task_seen, now)


def task_names(r: redis.Redis, keys: Keys) -> list[str]:
    names: set[str] = set()
    for shard in keys.all_shards:
        names.update(m.decode() for m in raw_set(r.smembers(shard.names)))
    return sorted(names)


def death(writer: Writer, hostname: str, when: float, now: float = 0.0) -> None:
    """What the enabler sends when it finds ``hostname`` dead: a death event, to every shard."""
    config = writer.config(now, False)
    for shard in writer.keys.all_shards:
        writer.script(
            keys=[shard.stream],
            args=apply_events.args(shard, config, [apply_events.death(hostname, when)]),
        )


def lost_tasks(r: redis.Redis, keys: Keys) -> dict[str, float]:
    """uuid -> lost_at of every task marked lost, checked against the ``lost`` index."""
    out: dict[str, float] = {}
    indexed: set[str] = set()
    for shard in keys.all_shards:
        indexed.update(m.decode() for m in raw_list(r.zrange(shard.lost, 0, -1)))
        for key in r.scan_iter(match=shard.task("*")):
            h = raw_hash(r.hgetall(key))
            if b"lost" in h:
                out[key.decode().rsplit(":", 1)[1]] = float(h[b"lost_at"])
    assert indexed == set(out), (indexed, out)
    return out


def lost_counts(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """``lostcounts`` summed over the shards (``<worker>\\x1f<name>`` -> tasks)."""
    out: dict[str, int] = {}
    for shard in keys.all_shards:
        for field, value in raw_hash(r.hgetall(shard.lostcounts)).items():
            out[field.decode()] = out.get(field.decode(), 0) + int(value)
    return out
