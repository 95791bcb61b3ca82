"""Worker retention: forget workers offline longer than ``POLLEN_OFFLINE_WORKER_TTL``, and the
longest-offline ones beyond ``POLLEN_MAX_WORKERS`` (Flower's ``--purge_offline_workers``).

A purge removes the worker's hash and set entries, its duplicate filter, its inspect answers
and every counter field labelled with it (so its ``/metrics`` series go), shard by shard with
``purge_worker.lua``, which leaves a worker alone when it came back since the decision. The
worker's tasks stay, with their ``worker`` field. A purged worker that comes back is new again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shared.keys import SEP, Keys
from shared.readers import worker_last_heartbeat, worker_offline_ts
from shared.workers import event_state, known_workers, offline_since, to_purge

log = logging.getLogger("pollen.enabler.retention")

_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]^"})


def field_pattern(host: str) -> str:
    """HSCAN MATCH pattern of ``host``'s fields in the counter hashes (``counts``...)."""
    return host.translate(_GLOB) + SEP + "*"


def interval(ttl: float) -> float:
    """Seconds between retention rounds: a tenth of the TTL, within 1 s and 60 s."""
    return min(60.0, max(1.0, ttl / 10)) if ttl else 60.0


async def purge_offline(
    client: Any,
    keys: Keys,
    script: Any,
    ttl: float,
    most: int,
    inspect_timeout: float,
    now: float | None = None,
) -> list[str]:
    """One retention round; the hostnames purged. Inspect answers count as signs of life at
    the time they surely came after: their storage time less ``inspect_timeout``."""
    now = time.time() if now is None else now
    hosts = await known_workers(client, keys)
    if not hosts:
        return []
    states = await event_state(client, keys, hosts)
    answered = {
        member.decode(): float(score) - inspect_timeout
        for member, score in await client.zrange(keys.inspected, 0, -1, withscores=True)
    }
    since = {
        host: offline_since(h, seen, answered.get(host))
        for host, (h, seen) in zip(hosts, states, strict=True)
    }
    doomed = set(to_purge(since, now, ttl, most))
    purged = []
    for host, (h, seen) in zip(hosts, states, strict=True):
        if host not in doomed:
            continue
        last = max(worker_last_heartbeat(h, seen) or 0.0, worker_offline_ts(h) or 0.0)
        home = keys.shard_for(host)
        pattern = field_pattern(host)
        args = [home.prefix, host, repr(last), pattern, "1"]
        if not await script(keys=[home.stream], args=args):
            continue  # it came back
        for shard in keys.all_shards:
            if shard.index != home.index:
                await script(
                    keys=[shard.stream], args=[shard.prefix, host, repr(last), pattern, "0"]
                )
        pipe = client.pipeline(transaction=False)
        pipe.delete(keys.inspect(host))
        pipe.zrem(keys.inspected, host)
        await pipe.execute()
        purged.append(host)
    if purged:
        log.info("forgot %d offline workers: %s", len(purged), ", ".join(purged[:20]))
    return purged
