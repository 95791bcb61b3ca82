"""``/api/failures``: failed and retried tasks grouped by exception class.

The collector keeps, per shard, the events of each class by worker, task name and subject
(``failures``), per minute (``failminute:<m>``), the first and last time each class was seen
(``failfirst``/``faillast``) and the tasks of each class (``idx:exc:<class>``, which
``/api/tasks?exception=<class>`` pages). This module merges the shards; ``/metrics`` reads the
same summary for ``pollen_task_failures_total``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import Context, ctx
from services.api.openapi import Spec, json_body, operation, param
from shared.keys import SEP

#: Most minutes of per-minute counts one answer carries (a day).
MAX_MINUTES = 1440
_encode = msgspec.json.encode


@dataclass(slots=True)
class ExceptionClass:
    name: str
    first_seen: float = float("inf")
    last_seen: float = float("-inf")
    #: events by subject (failed, retried), task name and worker
    subjects: Counter[str] = field(default_factory=Counter)
    tasks_by_name: Counter[str] = field(default_factory=Counter)
    workers: Counter[str] = field(default_factory=Counter)
    #: (worker, task name, subject) -> events, for the metric
    series: Counter[tuple[str, str, str]] = field(default_factory=Counter)


async def summary(c: Context) -> dict[str, ExceptionClass]:
    """Every exception class seen, merged over the shards."""
    pipe = c.redis.pipeline(transaction=False)
    for shard in c.keys.all_shards:
        pipe.hgetall(shard.failures)
        pipe.zrange(shard.failures_first, 0, -1, withscores=True)
        pipe.zrange(shard.failures_last, 0, -1, withscores=True)
    replies = await pipe.execute()
    out: dict[str, ExceptionClass] = {}
    for i in range(0, len(replies), 3):
        counts, firsts, lasts = replies[i : i + 3]
        for raw, value in counts.items():
            worker, exc, rest = raw.decode().split(SEP, 2)
            task, subject = rest.rsplit(SEP, 1)
            n = int(value)
            cls = out.setdefault(exc, ExceptionClass(exc))
            cls.subjects[subject] += n
            cls.tasks_by_name[task] += n
            cls.workers[worker] += n
            cls.series[(worker, task, subject)] += n
        for member, score in firsts:
            cls = out.setdefault(member.decode(), ExceptionClass(member.decode()))
            cls.first_seen = min(cls.first_seen, score)
        for member, score in lasts:
            cls = out.setdefault(member.decode(), ExceptionClass(member.decode()))
            cls.last_seen = max(cls.last_seen, score)
    return out


def labelled(classes: dict[str, ExceptionClass], cap: int) -> set[str]:
    """The classes that get their own ``exception`` label: the ``cap`` seen first. A class
    seen later goes under ``other`` for good, so every series stays a counter."""
    ranked = sorted(classes.values(), key=lambda x: (x.first_seen, x.name))
    return {x.name for x in ranked[:cap]}


async def list_failures(request: web.Request) -> web.Response:
    c = ctx(request)
    minutes = params.integer(request.query, "minutes", 60, minimum=1, maximum=MAX_MINUTES)
    assert minutes is not None
    classes = sorted((await summary(c)).values(), key=lambda x: (-x.last_seen, x.name))
    now_minute = int(time.time() // 60)
    window = range(now_minute - minutes + 1, now_minute + 1)
    pipe = c.redis.pipeline(transaction=False)
    for shard in c.keys.all_shards:
        for cls in classes:
            pipe.zcard(shard.by_exception(cls.name))
        for minute in window:
            pipe.hgetall(shard.failure_minute(minute))
    replies = iter(await pipe.execute())
    kept: Counter[str] = Counter()
    per_minute: dict[str, list[int]] = {cls.name: [0] * minutes for cls in classes}
    for _ in c.keys.all_shards:
        for cls in classes:
            kept[cls.name] += next(replies)
        for i, _minute in enumerate(window):
            for raw, value in next(replies).items():
                row = per_minute.get(raw.decode())
                if row is not None:
                    row[i] += int(value)
    body: dict[str, Any] = {
        "since_minute": window[0] * 60,
        "minutes": minutes,
        "classes": [
            {
                "exception": cls.name,
                "count": sum(cls.subjects.values()),
                "failed": cls.subjects["failed"],
                "retried": cls.subjects["retried"],
                "first_seen": cls.first_seen,
                "last_seen": cls.last_seen,
                "tasks_kept": kept[cls.name],
                "task_names": dict(cls.tasks_by_name.most_common()),
                "workers": dict(cls.workers.most_common()),
                "per_minute": per_minute[cls.name],
            }
            for cls in classes
        ],
    }
    return web.Response(body=_encode(body), content_type="application/json")


routes: list[Any] = [web.get("/api/failures", list_failures)]
_CLASS = {
    "type": "object",
    "properties": {
        "exception": {
            "type": "string",
            "description": "the class, as the exception's repr names it",
        },
        "count": {"type": "integer", "description": "task-failed and task-retried events"},
        "failed": {"type": "integer"},
        "retried": {"type": "integer"},
        "first_seen": {"type": "number", "description": "its first event's timestamp"},
        "last_seen": {"type": "number", "description": "its last event's timestamp"},
        "tasks_kept": {
            "type": "integer",
            "description": "tasks of the class still stored (/api/tasks?exception=<class>)",
        },
        "task_names": {"type": "object", "description": "events by task name"},
        "workers": {"type": "object", "description": "events by worker"},
        "per_minute": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "events per minute, oldest first, from since_minute",
        },
    },
}
openapi_paths: Spec = {
    "/api/failures": operation(
        "get",
        "Failed and retried tasks grouped by exception class, latest first (Pollen)",
        [
            param(
                "minutes",
                f"minutes of per-minute counts (default 60, at most {MAX_MINUTES})",
                {"type": "integer", "minimum": 1, "maximum": MAX_MINUTES},
            )
        ],
        json_body(
            "the classes",
            {
                "type": "object",
                "properties": {
                    "since_minute": {"type": "integer", "description": "start of per_minute"},
                    "minutes": {"type": "integer"},
                    "classes": {"type": "array", "items": _CLASS},
                },
            },
        ),
    ),
}
