"""Aggregates for frontends (the dashboard's charts and worker cards), read from what the
collector already keeps; nothing here loads tasks.

- ``GET /api/stats/workers``: every known worker's event fields (celery's ``Worker``), liveness,
  tasks executing now (its heartbeat's ``active``), its events by type (``counts``) and its
  tasks marked lost (``lostcounts``).
- ``GET /api/stats/tasks-per-minute``: the ``minute:<m>`` hashes as dense series, one per
  (task name, state): events whose subject gives that state, by the event's own minute.
- ``GET /api/stats/runtime``: the ``runtime`` histogram per task name (summed over workers, or
  one worker) with percentiles estimated as Prometheus' ``histogram_quantile`` does; with
  ``minutes``, over the tasks that succeeded in that window (``rtminute:<m>``), and with
  ``compare``, the same window a day earlier.
- ``GET /api/stats/wait``: the ``wait`` histograms (queue health) per stage, queue and task
  name, with percentiles; ``minutes`` and ``compare`` as for runtime (``wtminute:<m>``).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import Context, ctx
from services.api.errors import bad_param
from services.api.openapi import Spec, json_body, operation, param
from shared.histograms import labels, quantile
from shared.keys import RUNTIME_BUCKETS, SEP, WAIT_BUCKETS, WAIT_STAGES, Shard
from shared.readers import heartbeat_active, worker_from_hash
from shared.workers import event_state, known_workers, lost_counts

_encode = msgspec.json.encode
JSON = "application/json"
#: Most (task name, state) series one ``/api/stats/tasks-per-minute`` answer holds: those
#: with the most events; ``series_total`` says how many there were.
MAX_SERIES = 200
#: Minutes of counters read from Redis in one pipeline.
MINUTES_PER_READ = 60
#: Percentiles given per histogram by ``/api/stats/runtime`` and ``/api/stats/wait``.
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def _json(body: Any) -> web.Response:
    return web.Response(body=_encode(body), content_type=JSON)


async def workers_stats(request: web.Request) -> web.Response:
    c = ctx(request)
    now = time.time()
    return _json({"time": now, "workers": await worker_rows(c, now)})


async def worker_rows(c: Context, now: float) -> list[dict[str, Any]]:
    """Every known worker: event fields, liveness, executing now, events by type, lost."""
    hosts = await known_workers(c.redis, c.keys)
    states = await event_state(c.redis, c.keys, hosts)
    shards = c.keys.all_shards
    pipe = c.redis.pipeline(transaction=False)
    for shard in shards:
        pipe.hgetall(shard.counts)
    pipe.zrange(c.keys.inspected, 0, -1)
    replies = await pipe.execute()
    events: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for counts in replies[: len(shards)]:
        for field, count in counts.items():
            worker, kind, _ = field.decode().split(SEP, 2)
            events[worker][kind] += int(count)
    inspected = {m.decode() for m in replies[-1]}
    lost: Counter[str] = Counter()
    for (worker_name, _), count in (await lost_counts(c.redis, c.keys)).items():
        lost[worker_name] += count
    out = []
    for host, (h, seen) in zip(hosts, states, strict=True):
        worker = worker_from_hash(host, h, seen, now)
        # as Flower: what the worker's newest heartbeat says, not tasks stored as STARTED
        # (those stay STARTED when the worker dies)
        worker["executing"] = heartbeat_active(h) or 0
        worker["events"] = dict(sorted(events[host].items()))
        worker["inspected"] = host in inspected
        worker["lost"] = lost[host]
        out.append(worker)
    return out


async def per_minute(
    c: Context, first: int, last: int, key: Callable[[Shard, int], str]
) -> AsyncIterator[tuple[int, dict[bytes, bytes]]]:
    """``(minute, hash)`` of every shard's per-minute hash ``key(shard, minute)`` for minutes
    first..last, read a few minutes at a time: memory follows what is stored, not the window."""
    shards = c.keys.all_shards
    for chunk in range(first, last + 1, MINUTES_PER_READ):
        pipe = c.redis.pipeline(transaction=False)
        span = range(chunk, min(chunk + MINUTES_PER_READ, last + 1))
        for m in span:
            for shard in shards:
                pipe.hgetall(key(shard, m))
        for i, counts in enumerate(await pipe.execute()):
            yield chunk + i // len(shards), counts


def _window_param(c: Context, request: web.Request, default: int | None) -> int | None:
    most = c.settings.chart_retention_days * 1440
    minutes = params.integer(request.query, "minutes", default, minimum=1)
    if minutes is not None and minutes > most:
        raise bad_param("minutes", f"at most {most} (POLLEN_CHART_RETENTION_DAYS)")
    return minutes


async def tasks_per_minute(request: web.Request) -> web.Response:
    c = ctx(request)
    minutes = _window_param(c, request, 60)
    assert minutes is not None
    now = time.time()
    last = int(now // 60)
    first = last - minutes + 1
    # sparse rows: only the largest MAX_SERIES rows are made dense
    rows: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    async for m, counts in per_minute(c, first, last, Shard.minute):
        slot = m - first
        for field, value in counts.items():
            name, _, state = field.decode().rpartition(SEP)
            row = rows[(name, state)]
            row[slot] = row.get(slot, 0) + int(value)
    top = sorted(rows, key=lambda k: (-sum(rows[k].values()), k))[:MAX_SERIES]
    series = []
    for key in sorted(top):
        dense = [0] * minutes
        for slot, count in rows[key].items():
            dense[slot] = count
        series.append({"task": key[0], "state": key[1], "counts": dense})
    body = {
        "start": first * 60,
        "step": 60,
        "minutes": minutes,
        "time": now,
        "series": series,
        # series beyond MAX_SERIES (the smallest totals) are left out
        "series_total": len(rows),
    }
    return _json(body)


_RUNTIME = labels(RUNTIME_BUCKETS)
_WAIT = labels(WAIT_BUCKETS)


def _entry(
    row: list[float], total: float | None, buckets: tuple[float, ...] = RUNTIME_BUCKETS
) -> dict[str, Any]:
    """A histogram's counts and percentiles (``total``: its values' sum, when kept)."""
    count = sum(row)
    entry: dict[str, Any] = {
        "count": int(count),
        "sum": total,
        "mean": total / count if total is not None and count else None,
        "counts": [int(n) for n in row],
    }
    for q in QUANTILES:
        value = quantile(q, row, buckets)
        entry[f"p{round(q * 100)}"] = None if value is None or math.isnan(value) else value
    return entry


async def _window(
    c: Context, first: int, last: int, only_task: str | None
) -> dict[str, list[float]]:
    """Per task name, the runtime buckets of the tasks that succeeded in minutes first..last
    (``rtminute:<m>``), summed over the shards."""
    rows: dict[str, list[float]] = {}
    async for _, counts in per_minute(c, first, last, Shard.runtime_minute):
        for field, value in counts.items():
            name, _, bucket = field.decode().rpartition(SEP)
            if (only_task and name != only_task) or bucket not in _RUNTIME:
                continue
            rows.setdefault(name, [0.0] * len(_RUNTIME))[_RUNTIME[bucket]] += float(value)
    return rows


def _task(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"task": name, **entry}


async def runtime_stats(request: web.Request) -> web.Response:
    c = ctx(request)
    only_worker = params.text(request.query, "workername")
    only_task = params.text(request.query, "taskname")
    minutes = _window_param(c, request, None)
    compare = params.boolean(request.query, "compare", False)
    if minutes is None:
        if compare:
            raise bad_param("compare", "needs minutes (the window compared)")
        return _json(
            {"buckets": list(RUNTIME_BUCKETS), "tasks": await _all_time(c, only_worker, only_task)}
        )
    if only_worker:
        raise bad_param("workername", "not with minutes (the per-minute runtimes are by name)")
    now = time.time()
    last = int(now // 60)
    first = last - minutes + 1
    rows = await _window(c, first, last, only_task)
    body: dict[str, Any] = {
        "buckets": list(RUNTIME_BUCKETS),
        "start": first * 60,
        "minutes": minutes,
        "tasks": [_task(name, _entry(row, None)) for name, row in sorted(rows.items())],
    }
    if compare:
        # the same minutes a day earlier (kept while POLLEN_CHART_RETENTION_DAYS >= 2)
        before = await _window(c, first - 1440, last - 1440, only_task)
        body["day_before"] = {
            "start": (first - 1440) * 60,
            "tasks": [_task(name, _entry(row, None)) for name, row in sorted(before.items())],
        }
    return _json(body)


async def _all_time(
    c: Context, only_worker: str | None, only_task: str | None
) -> list[dict[str, Any]]:
    pipe = c.redis.pipeline(transaction=False)
    for shard in c.keys.all_shards:
        pipe.hgetall(shard.runtime)
    buckets: dict[str, list[float]] = {}
    sums: defaultdict[str, float] = defaultdict(float)
    for runtime in await pipe.execute():
        for field, value in runtime.items():
            worker, name, bucket = field.decode().split(SEP, 2)
            if (only_worker and worker != only_worker) or (only_task and name != only_task):
                continue
            row = buckets.setdefault(name, [0.0] * len(_RUNTIME))
            if bucket in _RUNTIME:
                row[_RUNTIME[bucket]] += float(value)
            elif bucket == "sum":
                sums[name] += float(value)
    return [_task(name, _entry(row, sums[name])) for name, row in sorted(buckets.items())]


WaitKey = tuple[str, str, str]


class _WaitFilter:
    """``/api/stats/wait``'s filters: stage, queue and task name (each optional)."""

    def __init__(self, request: web.Request) -> None:
        query = request.query
        stage = params.text(query, "stage")
        if stage is not None and stage not in WAIT_STAGES:
            raise bad_param("stage", f"one of {', '.join(WAIT_STAGES)}")
        self.stage = stage
        self.queue = params.text(query, "queue")
        self.task = params.text(query, "taskname")

    def split(self, field: bytes) -> tuple[WaitKey, str] | None:
        """``((stage, queue, task), bucket)`` of a ``wait``/``wtminute`` field it lets through."""
        parts = field.decode().split(SEP)
        if len(parts) != 4:
            return None
        stage, queue, task, bucket = parts
        if (
            (self.stage and stage != self.stage)
            or (self.queue is not None and queue != self.queue)
            or (self.task and task != self.task)
        ):
            return None
        return (stage, queue, task), bucket


def _waits(rows: dict[WaitKey, list[float]], sums: dict[WaitKey, float] | None) -> list[Any]:
    return [
        {
            "stage": stage,
            "queue": queue,
            "task": task,
            **_entry(row, sums.get((stage, queue, task), 0.0) if sums else None, WAIT_BUCKETS),
        }
        for (stage, queue, task), row in sorted(rows.items())
    ]


async def _wait_window(
    c: Context, first: int, last: int, only: _WaitFilter
) -> dict[WaitKey, list[float]]:
    rows: dict[WaitKey, list[float]] = {}
    async for _, counts in per_minute(c, first, last, Shard.wait_minute):
        for field, value in counts.items():
            split = only.split(field)
            if split is None or split[1] not in _WAIT:
                continue
            rows.setdefault(split[0], [0.0] * len(_WAIT))[_WAIT[split[1]]] += float(value)
    return rows


async def wait_stats(request: web.Request) -> web.Response:
    c = ctx(request)
    only = _WaitFilter(request)
    minutes = _window_param(c, request, None)
    compare = params.boolean(request.query, "compare", False)
    body: dict[str, Any] = {"buckets": list(WAIT_BUCKETS)}
    if minutes is None:
        if compare:
            raise bad_param("compare", "needs minutes (the window compared)")
        pipe = c.redis.pipeline(transaction=False)
        for shard in c.keys.all_shards:
            pipe.hgetall(shard.wait)
        rows: dict[WaitKey, list[float]] = {}
        sums: defaultdict[WaitKey, float] = defaultdict(float)
        for wait in await pipe.execute():
            for field, value in wait.items():
                split = only.split(field)
                if split is None:
                    continue
                key, bucket = split
                row = rows.setdefault(key, [0.0] * len(_WAIT))
                if bucket in _WAIT:
                    row[_WAIT[bucket]] += float(value)
                elif bucket == "sum":
                    sums[key] += float(value)
        body["waits"] = _waits(rows, sums)
        return _json(body)
    last = int(time.time() // 60)
    first = last - minutes + 1
    body.update(
        start=first * 60,
        minutes=minutes,
        waits=_waits(await _wait_window(c, first, last, only), None),
    )
    if compare:
        before = await _wait_window(c, first - 1440, last - 1440, only)
        body["day_before"] = {"start": (first - 1440) * 60, "waits": _waits(before, None)}
    return _json(body)


routes: list[Any] = [
    web.get("/api/stats/workers", workers_stats),
    web.get("/api/stats/tasks-per-minute", tasks_per_minute),
    web.get("/api/stats/runtime", runtime_stats),
    web.get("/api/stats/wait", wait_stats),
]


def _ok(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return json_body(description, {"type": "object", "properties": properties})


_COMPARE = param(
    "compare", "with minutes: also the same minutes a day earlier (day_before)", {"type": "boolean"}
)


def _window_minutes(what: str) -> Spec:
    return param(
        "minutes",
        f"only {what} in the last minutes (default: all time; at most "
        "POLLEN_CHART_RETENTION_DAYS days)",
        {"type": "integer", "minimum": 1},
    )


openapi_paths: Spec = {
    "/api/stats/workers": operation(
        "get",
        "Workers' event fields, liveness, tasks executing, events by type and tasks lost",
        [],
        _ok(
            "workers sorted by hostname: hostname, pid, freq, clock, active, processed, "
            "loadavg, sw_ident, sw_ver, sw_sys, last_heartbeat, alive, executing, "
            "events ({type: count}), inspected (the enabler has inspect answers), "
            "lost (its tasks marked lost now)",
            {"time": {"type": "number"}, "workers": {"type": "array"}},
        ),
    ),
    "/api/stats/tasks-per-minute": operation(
        "get",
        "Task events per minute by task name and state (charts)",
        [
            param(
                "minutes",
                "minutes up to now (default 60, at most POLLEN_CHART_RETENTION_DAYS days)",
                {"type": "integer", "minimum": 1},
            )
        ],
        _ok(
            "series[i].counts[j]: events of that task name whose subject gives that "
            "state (task-succeeded: SUCCESS...), in the minute start + j * step "
            "(epoch seconds, by the event's own timestamp); at most "
            f"{MAX_SERIES} series, those with the most events (series_total: how "
            "many there were)",
            {
                "start": {"type": "number"},
                "step": {"type": "integer"},
                "minutes": {"type": "integer"},
                "time": {"type": "number"},
                "series": {"type": "array"},
                "series_total": {"type": "integer"},
            },
        ),
    ),
    "/api/stats/runtime": operation(
        "get",
        "Runtime histogram and percentiles per task name (succeeded tasks)",
        [
            param("workername", "only this worker's runtimes (all-time only)"),
            param("taskname", "only this task name"),
            _window_minutes("tasks that succeeded"),
            _COMPARE,
        ],
        _ok(
            "per task name: count, sum and mean (all time only, else null), counts per "
            "bucket (buckets' upper bounds in seconds, then +Inf), p50/p90/p95/p99 estimated "
            "like Prometheus' histogram_quantile (a rank in +Inf gives the highest finite "
            "bound); with minutes, start (epoch seconds) and, with compare, day_before "
            "({start, tasks})",
            {
                "buckets": {"type": "array"},
                "tasks": {"type": "array"},
                "start": {"type": "number"},
                "minutes": {"type": "integer"},
                "day_before": {"type": "object"},
            },
        ),
    ),
    "/api/stats/wait": operation(
        "get",
        "Wait-time histograms and percentiles per stage, queue and task name (queue health)",
        [
            param("stage", "only this stage: queue or prefetch", {"enum": list(WAIT_STAGES)}),
            param("queue", "only this queue"),
            param("taskname", "only this task name"),
            _window_minutes("waits that ended"),
            _COMPARE,
        ],
        _ok(
            "waits[]: stage (queue: from task-sent, or its eta when later, to task-received; "
            "prefetch: from task-received, or its eta when later, to task-started), queue "
            "(task-sent's; empty when not seen), task, count, sum and mean (all time only, "
            "else null), counts per bucket (buckets' upper bounds in seconds, then +Inf), "
            "p50/p90/p95/p99 like Prometheus' histogram_quantile; with minutes, start and, "
            "with compare, day_before ({start, waits})",
            {
                "buckets": {"type": "array"},
                "waits": {"type": "array"},
                "start": {"type": "number"},
                "minutes": {"type": "integer"},
                "day_before": {"type": "object"},
            },
        ),
    ),
}
