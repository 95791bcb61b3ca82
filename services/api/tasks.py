"""Task endpoints: ``/api/tasks``, ``/api/task/info/{uuid}``, ``/api/task/types``.

Answers are spliced from the JSON text stored in the task hashes (no decode/re-encode), in
Flower's shapes: ``/api/tasks`` is an ordered object ``{uuid: task}`` whose tasks are
``Task.as_dict()`` with ``worker`` moved to the end and left out when null; ``/api/task/info``
is ``as_dict()`` with ``worker`` (the hostname) in place.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import Context, ctx
from services.api.errors import bad_param, not_found
from services.api.openapi import ERROR, ERRORS, Spec, json_body, operation, param
from services.api.query import SORT_KEYS, CursorError, Position, TaskQuery
from services.api.query.search import QuerySyntaxError, parse_query
from shared.events import TASK_FIELDS
from shared.readers import LOST_FIELDS, TASK_JSON_SOURCES

_encode = msgspec.json.encode
JSON = "application/json"

#: Response headers describing how a page was produced.
H_EXAMINED = "X-Pollen-Examined"
H_SCAN_CAPPED = "X-Pollen-Scan-Capped"
H_PAGE_CAPPED = "X-Pollen-Page-Capped"
H_NEXT_CURSOR = "X-Pollen-Next-Cursor"

_SOURCES = msgspec.msgpack.encode([*(src for _, src, _ in TASK_JSON_SOURCES), *LOST_FIELDS])
_DEFAULTS = [default for _, _, default in TASK_JSON_SOURCES]
_CELERY = len(_DEFAULTS)
_NAMES = [name for name, _, _ in TASK_JSON_SOURCES]
_WORKER = _NAMES.index("worker")
#: what precedes each value in an ``/api/task/info`` object, then in an ``/api/tasks`` item
#: (``worker`` moved last)
_INFO_PREFIXES = [(b'{"' if i == 0 else b',"') + n.encode() + b'":' for i, n in enumerate(_NAMES)]
_LIST_ORDER = [i for i in range(len(_NAMES)) if i != _WORKER]


async def fetch(c: Context, uuids: list[str], listing: bool) -> list[tuple[str, bytes]]:
    """The tasks as JSON objects, in order (tasks evicted meanwhile are left out): Flower's
    ``/api/tasks`` items (``listing``: ``worker`` moved last, left out when null) or its
    ``/api/task/info`` answers, spliced from the stored JSON (one ``task_json.lua`` call per
    shard reads them)."""
    if not uuids:
        return []
    replies = await asyncio.gather(
        *(
            c.task_json(keys=[shard.by_timestamp], args=[shard.prefix, _SOURCES, *uuids])
            for shard in c.keys.all_shards
        )
    )
    out = []
    for i, uuid in enumerate(uuids):
        values: bytes | None = None
        children: list[bytes] = []
        for reply in replies:
            found, kids = reply[i]
            if found:
                values = found
            children.extend(kids)
        if values is None:
            continue
        stored = values.split(b"\0")
        v = [x or d for x, d in zip(stored[:_CELERY], _DEFAULTS, strict=True)]
        kids_json = _encode(sorted(k.decode() for k in children))
        lost, lost_at = stored[_CELERY:]
        if lost:
            kids_json += b',"lost":' + lost + b',"lost_at":' + lost_at
        if listing:
            parts = [_INFO_PREFIXES[j] + v[j] for j in _LIST_ORDER]
            worker = v[_WORKER]
            tail = b"}" if worker == b"null" else b',"worker":' + worker + b"}"
        else:
            parts = [p + x for p, x in zip(_INFO_PREFIXES, v, strict=True)]
            tail = b"}"
        out.append((uuid, b"".join(parts) + b',"children":' + kids_json + tail))
    return out


def parse_task_query(
    request: web.Request, max_page: int, args: params.Args | None = None
) -> tuple[TaskQuery, bool]:
    """The query and whether its page size was capped at ``max_page``; from ``args`` when
    given (a POST's query string and form together), else the query string."""
    given: params.Args = request.query if args is None else args
    limit = params.integer(given, "limit", None)
    capped = limit is None or limit > max_page
    limit = max_page if limit is None or limit > max_page else limit
    offset = params.integer(given, "offset", 0)
    assert offset is not None
    sort_by = params.text(given, "sort_by")
    sort, desc = "", True
    if sort_by:
        sort = sort_by.lstrip("-")
        desc = sort_by.startswith("-")
        if sort not in SORT_KEYS:
            raise bad_param(
                "sort_by",
                f"invalid sort_by {sort_by!r}, expected one of {', '.join(sorted(SORT_KEYS))}"
                " (a leading '-' sorts descending)",
            )
    search = given.get("search") or ""
    try:
        parse_query(search)
    except QuerySyntaxError as exc:
        raise bad_param("search", str(exc)) from None
    query = TaskQuery(
        state=params.text(given, "state", all_is_none=True),
        name=params.text(given, "taskname", all_is_none=True),
        worker=params.text(given, "workername", all_is_none=True),
        received=params.time_range(given, "received_start", "received_end"),
        started=params.time_range(given, "started_start", "started_end"),
        search=search.strip(),
        lost=params.boolean(given, "lost", False),
        exception=params.text(given, "exception"),
        sort=sort,
        desc=desc,
        offset=offset,
        limit=limit,
        cursor=params.text(given, "cursor"),
    )
    return query, capped


async def walk(
    c: Context, query: TaskQuery, wanted: Callable[[], bool], total: int | None = None
) -> AsyncGenerator[list[bytes], None]:
    """Every task of ``query`` (``total`` at most), page after page of ``/api/task/info``
    objects: the query's own first page (offset, cursor), then on through the cursor engine
    (``Page.resume`` also goes on past a page the scan budget cut short). One page in memory
    and one bounded engine run at a time; ``ConnectionResetError`` once ``wanted()`` is false.
    A bad cursor raises ``CursorError`` before the first page."""
    query = dataclasses.replace(query, limit=c.settings.max_page)
    if total is not None and total < query.limit:
        query = dataclasses.replace(query, limit=total)
    page = await c.engine.run(query, wanted)
    query = dataclasses.replace(query, offset=0, cursor=None)
    sent = 0
    while True:
        tasks = [task for _, task in await fetch(c, page.uuids, listing=False)]
        yield tasks
        sent += len(tasks)
        at: Position | None = page.resume
        if at is None or (total is not None and sent >= total):
            return
        if not wanted():
            raise ConnectionResetError
        if total is not None:
            query = dataclasses.replace(query, limit=min(query.limit, total - sent))
        page = await c.engine.run(query, wanted, at)
        if not wanted():
            raise ConnectionResetError


def client_gone(request: web.Request) -> bool:
    """Whether the request's client has left (its connection is closing or closed)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def list_tasks(request: web.Request) -> web.Response:
    c = ctx(request)
    query, capped = parse_task_query(request, c.settings.max_page)
    try:
        page = await c.engine.run(query, lambda: not client_gone(request))
    except CursorError as exc:
        raise bad_param("cursor", str(exc)) from None
    tasks = await fetch(c, page.uuids, listing=True)
    body = b"{" + b",".join(_encode(u) + b":" + task for u, task in tasks) + b"}"
    headers = {H_EXAMINED: str(page.examined), H_SCAN_CAPPED: "true" if page.capped else "false"}
    if capped:
        headers[H_PAGE_CAPPED] = str(c.settings.max_page)
    if page.next_cursor:
        headers[H_NEXT_CURSOR] = page.next_cursor
    return web.Response(body=body, content_type=JSON, headers=headers)


async def task_info(request: web.Request) -> web.Response:
    c = ctx(request)
    uuid = request.match_info["uuid"]
    found = await fetch(c, [uuid], listing=False)
    if not found:
        raise not_found(f"Unknown task '{uuid}'")
    return web.Response(body=found[0][1], content_type=JSON)


async def task_types(request: web.Request) -> web.Response:
    names = await ctx(request).engine.task_names()
    return web.Response(body=_encode({"task-types": names}), content_type=JSON)


routes: list[Any] = [
    web.get("/api/tasks", list_tasks),
    web.get("/api/task/info/{uuid:.+}", task_info),
    web.get("/api/task/types", task_types),
]
TASK = {
    "type": "object",
    "description": "celery's Task.as_dict() with worker as the hostname",
    "properties": {
        **{name: {} for name in TASK_FIELDS},
        "lost": {"type": "boolean", "description": "present (true) while the task is lost"},
        "lost_at": {"type": "number", "description": "the death of its worker that lost it"},
    },
}
_TIME = {
    "type": "string",
    "description": "'YYYY-MM-DD HH:MM' in the server's local time (as Flower), or unix seconds",
}
#: What each header of a page says.
_HEADERS = {
    H_EXAMINED: ("index entries examined by filters and search", "integer"),
    H_SCAN_CAPPED: (
        "true when the scan stopped at POLLEN_SEARCH_SCAN_LIMIT (page may be short)",
        "string",
    ),
    H_PAGE_CAPPED: (
        "present when the page size was capped at POLLEN_MAX_PAGE (its value)",
        "integer",
    ),
    H_NEXT_CURSOR: (
        "pass as cursor= for the next page (present when the page is full)",
        "string",
    ),
}
_PAGE = {
    **json_body("ordered object uuid -> task", {"type": "object", "additionalProperties": TASK}),
    "headers": {
        name: {"description": text, "schema": {"type": kind}}
        for name, (text, kind) in _HEADERS.items()
    },
}


def task_query_params() -> list[Spec]:
    """The query parameters of a task listing after ``limit``: what selects and orders the
    tasks (``/api/tasks`` and ``/api/tasks/export`` take the same)."""
    return [
        param("offset", "tasks skipped", {"type": "integer", "minimum": 0}),
        param("sort_by", "name, state, received or started; '-' prefix: descending"),
        param("workername", "worker hostname (case-insensitive; All = any)"),
        param("taskname", "task name (case-insensitive; All = any)"),
        param("state", "task state (case-insensitive; All = any)"),
        param("received_start", "received at or after (tasks never received pass)", _TIME),
        param("received_end", "received at or before (tasks never received pass)", _TIME),
        param("started_start", "started at or after (tasks never started pass)", _TIME),
        param("started_end", "started at or before (tasks never started pass)", _TIME),
        param("search", "Flower's task-filter query syntax"),
        param(
            "lost",
            "only tasks marked lost: RECEIVED or STARTED on a worker that died"
            " (Pollen; each then has lost: true and lost_at)",
            {"type": "boolean"},
        ),
        param(
            "exception",
            "only tasks with a task-failed or task-retried of this exception class (exact, as"
            " /api/failures names it; Pollen)",
        ),
        param("cursor", "X-Pollen-Next-Cursor of a page: start after it"),
    ]


openapi_paths: Spec = {
    "/api/tasks": operation(
        "get",
        "List tasks (Flower-compatible)",
        [
            param(
                "limit",
                "page size (default and maximum: POLLEN_MAX_PAGE)",
                {"type": "integer", "minimum": 0},
            ),
            *task_query_params(),
        ],
        _PAGE,
    ),
    "/api/task/info/{uuid}": operation(
        "get",
        "One task (Flower-compatible)",
        [param("uuid", "task id", where="path")],
        json_body("the task", TASK),
        {**ERRORS, "404": json_body("unknown task", ERROR)},
    ),
    "/api/task/types": operation(
        "get",
        "Task names seen",
        [],
        json_body(
            "task names", {"type": "object", "properties": {"task-types": {"type": "array"}}}
        ),
    ),
}
