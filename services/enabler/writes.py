"""The enabler's writes to Redis: inspect answers and queue samples (their shapes and readers
are in ``shared/inspected.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import redis

from shared.keys import Keys

_encode = msgspec.json.Encoder(enc_hook=repr).encode
_decode = msgspec.json.decode


async def store_answers(
    client: Any,
    keys: Keys,
    method: str,
    answers: Mapping[str, Any],
    missing: Iterable[str],
    timeout: float,
    ttl: float,
    now: float | None = None,
) -> None:
    """Store one inspect method's answers; ``missing`` hosts were expected but did not answer."""
    now = time.time() if now is None else now
    ttl_s = max(1, int(ttl))
    pipe = client.pipeline(transaction=False)
    for host, answer in answers.items():
        key = keys.inspect(host)
        if isinstance(answer, dict) and set(answer) == {"error"}:
            refused = {"error": str(answer["error"]), "time": now}
            pipe.hset(key, f"{method}:error", _encode(refused))
            pipe.expire(key, ttl_s, nx=True)
            continue
        if method == "stats" and isinstance(answer, dict):
            # as Flower: the broker's alternates list can hold credentials of other brokers
            broker = answer.get("broker")
            if isinstance(broker, dict):
                broker.pop("alternates", None)
        now_json = _encode(now)
        pipe.hset(
            key,
            mapping={method: _encode(answer), f"{method}:time": now_json, "timestamp": now_json},
        )
        pipe.hdel(key, f"{method}:error")
        pipe.expire(key, ttl_s)
        pipe.zadd(keys.inspected, {host: now})
    no_answer = _encode({"error": f"no answer within {timeout:g} s", "time": now})
    for host in missing:
        if host in answers:
            continue
        key = keys.inspect(host)
        pipe.hset(key, f"{method}:error", no_answer)
        pipe.expire(key, ttl_s, nx=True)
    pipe.zremrangebyscore(keys.inspected, "-inf", now - ttl)
    await pipe.execute()


async def inspected_queue_names(client: Any, keys: Keys) -> set[str]:
    """Names of the queues the inspected workers consume from (their ``active_queues``)."""
    hosts = [h.decode() for h in await client.zrange(keys.inspected, 0, -1)]
    if not hosts:
        return set()
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.hget(keys.inspect(host), "active_queues")
    names: set[str] = set()
    for raw in await pipe.execute():
        if raw is None:
            continue
        for queue in _decode(raw) or ():
            if isinstance(queue, dict) and isinstance(queue.get("name"), str):
                names.add(queue["name"])
    return names


async def store_queues(
    client: Any,
    keys: Keys,
    samples: list[dict[str, Any]],
    history_maxlen: int,
    now: float | None = None,
) -> bool:
    """Replace ``<ns>:queues`` with ``samples``; append the minute's history entry if it is
    the first sample of that minute. Returns whether a history entry was appended."""
    now = time.time() if now is None else now
    wanted = {s["name"] for s in samples}
    old = {n.decode() for n in await client.hkeys(keys.queues)}
    pipe = client.pipeline(transaction=False)
    if samples:
        pipe.hset(keys.queues, mapping={s["name"]: _encode(s) for s in samples})
    stale = old - wanted
    if stale:
        pipe.hdel(keys.queues, *stale)
    await pipe.execute()
    minute_ms = int(now // 60) * 60_000
    try:
        await client.xadd(
            keys.queues_history,
            {"q": _encode({s["name"]: s["messages"] for s in samples})},
            id=f"{minute_ms}-0",
            maxlen=history_maxlen,
            approximate=False,
        )
    except redis.ResponseError as exc:
        # an entry for this minute exists already (ids only grow): nothing to add
        if "equal or smaller" not in str(exc):
            raise
        return False
    return True


async def sent_times(client: Any, keys: Keys, task_ids: list[str]) -> dict[str, float]:
    """The task-sent time Pollen holds for each of ``task_ids`` that has one."""
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hget(keys.shard_for(task_id).task(task_id), "sent")
    out: dict[str, float] = {}
    for task_id, raw in zip(task_ids, await pipe.execute() if task_ids else [], strict=True):
        value = _decode(raw) if raw else None
        if isinstance(value, int | float):
            out[task_id] = float(value)
    return out
