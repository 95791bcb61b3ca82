"""What the enabler stores in Redis and how readers turn it back into Flower's shapes.

The writers are the enabler's; the readers (``worker_inspect``, ``inspect_errors``,
``queue_lengths``, ``history_entry``) are pure functions shared with the API and the tests.
Every key is named in ``shared/keys.py``; the shapes are documented there and in
``docs/enabler.md``:

``<ns>:inspect:<hostname>`` (hash), per inspect method ``m`` (``INSPECT_METHODS``):
    ``m``          JSON: the worker's latest answer, as ``app.control.inspect().m()`` gives it
                   for that worker
    ``m:time``     JSON number: when that answer arrived (epoch seconds)
    ``m:error``    JSON ``{"error": str, "time": float}``: the latest attempt got no answer (or
                   the worker answered an error); removed by the next answer. The previous
                   answer stays, with its time.
    ``timestamp``  JSON number: the newest answer of any method (Flower's ``timestamp``)
    The key expires ``POLLEN_INSPECT_TTL`` seconds after the worker's last answer.
``<ns>:inspected`` (zset): hostname by the time of its newest answer.
``<ns>:queues`` (hash): queue name -> JSON ``{"name", "messages", "consumers", "time"}``;
    ``consumers`` is null on a Redis broker. Only the queues of the latest sample.
``<ns>:queues:history`` (stream): one entry per minute, id ``<minute start in ms>-0``, field
    ``q`` -> JSON ``{queue name: messages}`` of the first sample of that minute.
``<ns>:audit`` (stream): field ``e`` -> JSON ``{"time", "who", "action", "target", "params",
    "status", "reply"}`` per control call.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import redis

from shared.keys import Keys
from shared.records import worker_alive

#: Inspect methods the enabler refreshes; the first four are Flower's per-worker summary.
INSPECT_METHODS: tuple[str, ...] = (
    "stats",
    "active_queues",
    "registered",
    "conf",
    "active",
    "reserved",
    "scheduled",
    "revoked",
)

_encode = msgspec.json.Encoder(enc_hook=repr).encode
_decode = msgspec.json.decode

Hash = Mapping[bytes, bytes]


# --- readers -------------------------------------------------------------------------------------


def worker_inspect(h: Hash) -> dict[str, Any]:
    """Flower's per-worker object of ``/api/workers``: each answered method and ``timestamp``."""
    out: dict[str, Any] = {}
    for method in INSPECT_METHODS:
        raw = h.get(method.encode())
        if raw is not None:
            out[method] = _decode(raw)
    raw_ts = h.get(b"timestamp")
    if raw_ts is not None:
        out["timestamp"] = _decode(raw_ts)
    return out


def inspect_errors(h: Hash) -> dict[str, dict[str, Any]]:
    """``{method: {"error", "time"}}`` for the methods whose latest attempt failed."""
    out: dict[str, dict[str, Any]] = {}
    for method in INSPECT_METHODS:
        raw = h.get(f"{method}:error".encode())
        if raw is not None:
            out[method] = _decode(raw)
    return out


def queue_lengths(h: Hash) -> list[dict[str, Any]]:
    """The samples of ``<ns>:queues``, sorted by queue name."""
    samples = [_decode(v) for v in h.values()]
    return sorted(samples, key=lambda s: str(s.get("name")))


def history_entry(entry_id: bytes | str, fields: Hash) -> dict[str, Any]:
    """One ``<ns>:queues:history`` entry as ``{"time": minute start, "queues": {name: n}}``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms = int(text.split("-", 1)[0])
    return {"time": ms / 1000.0, "queues": _decode(fields[b"q"])}


# --- writers -------------------------------------------------------------------------------------


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


async def record_audit(client: Any, keys: Keys, entry: Mapping[str, Any], maxlen: int) -> str:
    """Append one control call to ``<ns>:audit``; returns the entry id."""
    entry_id = await client.xadd(keys.audit, {"e": _encode(dict(entry))}, maxlen=maxlen)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def audit_entry(entry_id: bytes | str, fields: Hash) -> dict[str, Any]:
    """One ``<ns>:audit`` entry as the API returns it: its id plus the recorded fields."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    out: dict[str, Any] = {"id": text}
    out.update(_decode(fields[b"e"]))
    return out
