"""Task endpoints: ``/api/tasks``, ``/api/task/info/{uuid}``, ``/api/task/types``.

Answers are spliced from the JSON text stored in the task hashes (no decode/re-encode), in
Flower's shapes: ``/api/tasks`` is an ordered object ``{uuid: task}`` whose tasks are
``Task.as_dict()`` with ``worker`` moved to the end and left out when null; ``/api/task/info``
is ``as_dict()`` with ``worker`` (the hostname) in place.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import Context, ctx
from services.api.errors import bad_param, not_found
from services.api.query import SORT_KEYS, TaskQuery
from services.api.search import QuerySyntaxError, parse_query
from shared.records import task_json_fields

_encode = msgspec.json.encode
JSON = "application/json"

#: Response headers describing how a page was produced.
H_EXAMINED = "X-Pollen-Examined"
H_SCAN_CAPPED = "X-Pollen-Scan-Capped"
H_PAGE_CAPPED = "X-Pollen-Page-Capped"
H_NEXT_CURSOR = "X-Pollen-Next-Cursor"

Fields = list[tuple[str, bytes]]


async def fetch(c: Context, uuids: list[str]) -> list[tuple[str, Fields]]:
    """The tasks' ``(field, JSON)`` lists, in order; tasks evicted meanwhile are left out."""
    if not uuids:
        return []
    shards = c.keys.all_shards
    pipe = c.redis.pipeline(transaction=False)
    for uuid in uuids:
        pipe.hgetall(c.keys.shard_for(uuid).task(uuid))
        for shard in shards:
            pipe.smembers(shard.children(uuid))
    replies = await pipe.execute()
    out = []
    step = len(shards) + 1
    for i, uuid in enumerate(uuids):
        h = replies[i * step]
        if not h:
            continue
        children = {m.decode() for s in replies[i * step + 1 : (i + 1) * step] for m in s}
        out.append((uuid, task_json_fields(h, children)))
    return out


def _object(fields: Fields) -> bytes:
    return b"{" + b",".join(b'"' + k.encode() + b'":' + v for k, v in fields) + b"}"


def list_item(fields: Fields) -> bytes:
    """Flower's ``/api/tasks`` task: ``worker`` popped, re-added last when not null."""
    worker = b"null"
    rest = []
    for k, v in fields:
        if k == "worker":
            worker = v
        else:
            rest.append((k, v))
    if worker != b"null":
        rest.append(("worker", worker))
    return _object(rest)


def parse_task_query(request: web.Request, max_page: int) -> tuple[TaskQuery, bool]:
    """The query and whether its page size was capped at ``max_page``."""
    limit = params.integer(request, "limit", None)
    capped = limit is None or limit > max_page
    limit = max_page if limit is None or limit > max_page else limit
    offset = params.integer(request, "offset", 0)
    assert offset is not None
    sort_by = params.text(request, "sort_by")
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
    search = request.query.get("search") or ""
    try:
        parse_query(search)
    except QuerySyntaxError as exc:
        raise bad_param("search", str(exc)) from None
    query = TaskQuery(
        state=params.text(request, "state", all_is_none=True),
        name=params.text(request, "taskname", all_is_none=True),
        worker=params.text(request, "workername", all_is_none=True),
        received=params.time_range(request, "received_start", "received_end"),
        started=params.time_range(request, "started_start", "started_end"),
        search=search.strip(),
        sort=sort,
        desc=desc,
        offset=offset,
        limit=limit,
        cursor=params.text(request, "cursor"),
    )
    return query, capped


async def list_tasks(request: web.Request) -> web.Response:
    c = ctx(request)
    query, capped = parse_task_query(request, c.settings.max_page)
    page = await c.engine.run(query)
    tasks = await fetch(c, page.uuids)
    body = b"{" + b",".join(_encode(u) + b":" + list_item(f) for u, f in tasks) + b"}"
    headers = {H_EXAMINED: str(page.examined), H_SCAN_CAPPED: "true" if page.capped else "false"}
    if capped:
        headers[H_PAGE_CAPPED] = str(c.settings.max_page)
    if page.next_cursor:
        headers[H_NEXT_CURSOR] = page.next_cursor
    return web.Response(body=body, content_type=JSON, headers=headers)


async def task_info(request: web.Request) -> web.Response:
    c = ctx(request)
    uuid = request.match_info["uuid"]
    found = await fetch(c, [uuid])
    if not found:
        raise not_found(f"Unknown task '{uuid}'")
    return web.Response(body=_object(found[0][1]), content_type=JSON)


async def task_types(request: web.Request) -> web.Response:
    names = await ctx(request).engine.task_names()
    return web.Response(body=_encode({"task-types": names}), content_type=JSON)


routes: list[Any] = [
    web.get("/api/tasks", list_tasks),
    web.get("/api/task/info/{uuid:.+}", task_info),
    web.get("/api/task/types", task_types),
]
