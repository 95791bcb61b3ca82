"""The call of ``apply_events.lua``: its configuration, the same for whoever calls it.

The collector calls it with the events of a batch; the enabler with ``death`` events, one per
worker found dead, to every shard (``services/enabler/deaths.py``). Both run the one merge
and retention, configured from the same settings.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared import retention, scripts
from shared.keys import Keys, Shard
from shared.redaction import Redactor
from shared.settings import Settings

_pack = msgspec.msgpack.encode


def config(settings: Settings, keys: Keys, now: float, age_check: bool) -> bytes:
    """ARGV[2] of ``apply_events.lua`` (its header documents the fields)."""
    s = settings
    return _pack(
        {
            "now": now,
            "max_tasks": -(-s.max_tasks // s.shards),
            "task_ttl": s.task_ttl,
            "failed_ttl": s.failed_task_ttl,
            "stream_maxlen": s.stream_maxlen,
            "channel": keys.events_channel,
            "minute_ttl": s.chart_retention_days * 86400,
            "evict_batch": max(2 * s.batch_size, 100),
            "age_check": age_check,
            # retention by task name (first rule matching name and state wins)
            "retention": retention.lua_rules(s.task_retention),
            # task name redaction rules for the fields an event without a name holds back
            "redact": Redactor.from_settings(s.redact_keys, s.redact_fields).lua_rules(),
        }
    )


def death(hostname: str, timestamp: float) -> dict[str, Any]:
    """A ``death`` event: ``hostname`` found dead, its last sign of life at ``timestamp``."""
    return {"kind": "death", "hostname": hostname, "timestamp_json": repr(timestamp)}


def register(client: Any) -> Any:
    return scripts.register(client, "apply_events")


def args(shard: Shard, config: bytes, events: list[dict[str, Any]]) -> list[Any]:
    """The script's ARGV for one shard."""
    return [shard.prefix, config, _pack(events)]
