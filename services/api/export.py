"""``/api/tasks/export``: any ``/api/tasks`` query streamed whole, as NDJSON or CSV.

The query is walked page after page (``tasks.walk``), so memory stays one page whatever the
size, and the walk stops as soon as the client is gone: before each page, inside a scan, and
when a write fails (the server also cancels a handler whose client is gone). Each page is one
bounded engine run, so no Redis call is longer than a listing's.
An NDJSON line is ``/api/task/info/{uuid}``'s object; a CSV row has the same fields as columns.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from typing import Any

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import ctx
from services.api.errors import bad_param
from services.api.openapi import Spec, operation, param
from services.api.query import CursorError
from services.api.tasks import client_gone, parse_task_query, task_query_params, walk
from shared.events import TASK_FIELDS
from shared.readers import LOST_FIELDS

#: CSV columns: celery's ``Task.as_dict()`` fields, then Pollen's lost mark.
COLUMNS: tuple[str, ...] = (*TASK_FIELDS, *LOST_FIELDS)
FORMATS = {"ndjson": "application/x-ndjson", "csv": "text/csv"}
log = logging.getLogger("pollen.api.export")
_decode = msgspec.json.Decoder()
_encode = msgspec.json.encode


def csv_rows(tasks: list[bytes], header: bool) -> str:
    """CSV text of tasks given as JSON objects: strings as they are, numbers and booleans as
    JSON spells them, lists and objects as JSON, null and missing fields empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(COLUMNS)
    for raw in tasks:
        task = _decode.decode(raw)
        writer.writerow([_cell(task.get(column)) for column in COLUMNS])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _encode(value).decode()


async def export_tasks(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    fmt = params.choice(request.query, "format", tuple(FORMATS), "ndjson")
    # the page size is the engine's; limit caps the whole export (none by default)
    total = params.integer(request.query, "limit", None)
    query, _ = parse_task_query(request, c.settings.max_page)

    def wanted() -> bool:
        return not client_gone(request)

    pages = walk(c, query, wanted, total)
    try:
        first = await anext(pages)
    except CursorError as exc:
        raise bad_param("cursor", str(exc)) from None
    except StopAsyncIteration:
        first = []
    response = web.StreamResponse(
        headers={
            "Content-Type": f"{FORMATS[fmt]}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="tasks.{fmt}"',
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    sent, header = 0, fmt == "csv"
    try:
        tasks: list[bytes] | None = first
        while tasks is not None:
            if fmt == "csv":
                await response.write(csv_rows(tasks, header).encode())
                header = False
            elif tasks:
                await response.write(b"\n".join(tasks) + b"\n")
            sent += len(tasks)
            tasks = await anext(pages, None)
    except ConnectionError:
        log.info("export stopped after %d tasks: the client left", sent)
        return response
    except asyncio.CancelledError:
        # the client left while the handler waited (the server cancels its handlers then)
        log.info("export stopped after %d tasks: the client left", sent)
        raise
    finally:
        await pages.aclose()
    await response.write_eof()
    log.info("export done: %d tasks", sent)
    return response


routes: list[Any] = [web.get("/api/tasks/export", export_tasks)]
openapi_paths: Spec = {
    "/api/tasks/export": operation(
        "get",
        "Every task of an /api/tasks query, streamed (Pollen)",
        [
            param(
                "format",
                "ndjson (default: one /api/task/info object a line) or csv (a header row, "
                "then the same fields as columns)",
                {"type": "string", "enum": list(FORMATS)},
            ),
            param(
                "limit",
                "at most this many tasks (default: all of them)",
                {"type": "integer", "minimum": 0},
            ),
            *task_query_params(),
        ],
        {
            "200": {
                "description": "the tasks, in the query's order, streamed until the last",
                "content": {kind: {"schema": {"type": "string"}} for kind in FORMATS.values()},
            }
        },
    ),
}
