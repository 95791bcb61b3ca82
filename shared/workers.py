"""Which workers Pollen knows and which are alive: one answer for every service.

Known: named by worker events (``workers``), task events (``seen``) or inspect answers
(``inspected``). Alive: celery's ``Worker.alive`` from the heartbeats the collector keeps
(``shared.readers.worker_alive``).
"""

from __future__ import annotations

from typing import Any

from shared.keys import Keys
from shared.readers import worker_alive


async def known_workers(client: Any, keys: Keys) -> list[str]:
    """Hostnames known from worker events, task events and inspect answers, sorted."""
    pipe = client.pipeline(transaction=False)
    for shard in keys.all_shards:
        pipe.zrange(shard.workers, 0, -1)
        pipe.zrange(shard.seen, 0, -1)
    pipe.zrange(keys.inspected, 0, -1)
    names: set[str] = set()
    for members in await pipe.execute():
        names.update(m.decode() for m in members)
    return sorted(names)


async def event_state(
    client: Any, keys: Keys, hostnames: list[str]
) -> list[tuple[dict[bytes, bytes], Any]]:
    """Per hostname: its worker hash and newest task-event time (``seen``) over the shards."""
    pipe = client.pipeline(transaction=False)
    for host in hostnames:
        pipe.hgetall(keys.shard_for(host).worker(host))
        for shard in keys.all_shards:
            pipe.zscore(shard.seen, host)
    replies = await pipe.execute()
    step = len(keys.all_shards) + 1
    out = []
    for i in range(len(hostnames)):
        seen = [s for s in replies[i * step + 1 : (i + 1) * step] if s is not None]
        out.append((replies[i * step], max(seen) if seen else None))
    return out


async def alive_workers(client: Any, keys: Keys, now: float) -> set[str]:
    """Hostnames that worker events say are alive now (celery's ``Worker.alive``)."""
    hosts: list[tuple[str, Any]] = []
    for shard in keys.all_shards:
        # a worker beating in the last hour may be alive (freq is at most a few minutes)
        names = await client.zrangebyscore(shard.workers, now - 3600, "+inf")
        hosts.extend((n.decode(), shard) for n in names)
    if not hosts:
        return set()
    pipe = client.pipeline(transaction=False)
    for host, shard in hosts:
        pipe.hgetall(shard.worker(host))
        pipe.zscore(shard.seen, host)
    replies = await pipe.execute()
    alive = set()
    for i, (host, _shard) in enumerate(hosts):
        h, seen = replies[2 * i], replies[2 * i + 1]
        if worker_alive(h, seen, now):
            alive.add(host)
    return alive
