"""Which workers Pollen knows and which are alive: one answer for every service.

Known: named by worker events (``workers``), task events (``seen``) or inspect answers
(``inspected``). Alive: celery's ``Worker.alive`` from the heartbeats the collector keeps
(``shared.readers.worker_alive``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from shared.keys import SEP, Keys
from shared.readers import (
    EXPIRE_WINDOW,
    Hash,
    worker_alive,
    worker_freq,
    worker_last_heartbeat,
    worker_last_word,
    worker_offline_ts,
    worker_online_ts,
)


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


async def lost_counts(client: Any, keys: Keys) -> Counter[tuple[str, str]]:
    """Tasks marked lost now, by (worker, task name), over the shards (``lostcounts``)."""
    pipe = client.pipeline(transaction=False)
    for shard in keys.all_shards:
        pipe.hgetall(shard.lostcounts)
    out: Counter[tuple[str, str]] = Counter()
    for fields in await pipe.execute():
        for field, count in fields.items():
            worker, name = field.decode().split(SEP, 1)
            out[(worker, name)] += int(count)
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


def offline_since(h: Hash, task_seen: float | None, answered: float | None) -> float:
    """When the worker went offline by celery's rule: its newest sign of life (a heartbeat, a
    task event, an inspect answer: ``answered``, see ``deaths``) plus 2 x its heartbeat
    interval, or the time of its worker-offline when that is the newest thing it said. A live
    worker's is in the future."""
    window = worker_freq(h) * EXPIRE_WINDOW
    last = worker_last_heartbeat(h, task_seen)
    offline = worker_offline_ts(h)
    if last is None and offline is not None and (answered is None or answered <= offline):
        return offline
    return max(last or 0.0, answered or 0.0) + window


def deaths(h: Hash, task_seen: float | None, answered: float | None, now: float) -> list[float]:
    """The deaths of a worker that its events tell at ``now``, as sender times (what its tasks'
    event times compare with): its newest worker-online's, which ends the incarnation before
    it (a worker restarted under its hostname says nothing else of the old one), and, once it
    is offline (``offline_since``: celery's rule, an inspect answer counting as a heartbeat,
    so that a worker whose beats stop but which still answers is not dead), its last word
    (``readers.worker_last_word``). ``answered``: a time its newest inspect answer surely came
    after (the enabler stores answers when its wait ends, up to ``POLLEN_INSPECT_TIMEOUT``
    after they came)."""
    out = []
    online = worker_online_ts(h)
    if online is not None:
        out.append(online)
    last = worker_last_word(h, task_seen)
    if last is None or offline_since(h, task_seen, answered) > now:
        return out
    if last not in out:
        out.append(last)
    return out


def to_purge(offline: dict[str, float], now: float, ttl: float, most: int) -> list[str]:
    """The workers to forget: offline longer than ``ttl`` (0: no age limit), then, while more
    than ``most`` are known, the longest offline first; never one that is alive.
    ``offline``: every known worker's ``offline_since``."""
    gone = sorted((since, host) for host, since in offline.items() if since <= now)
    doomed = [host for since, host in gone if ttl and now - since >= ttl]
    excess = len(offline) - len(doomed) - most
    if excess > 0:
        rest = [host for _, host in gone if host not in set(doomed)]
        doomed.extend(rest[:excess])
    return doomed
