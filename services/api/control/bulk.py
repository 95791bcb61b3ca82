"""Bulk actions over an ``/api/tasks`` query (Pollen's): revoke (optionally terminate) or
re-send every task the query selects.

- Operator role, as every control call; the filters are ``/api/tasks``'s, in the query string.
- Capped: at most ``limit`` tasks (default and most ``POLLEN_BULK_MAX``), in the query's
  order; ``capped`` says more matched, so a second run takes the next ones.
- A dry run by default: ``dry_run=false`` acts, anything else only lists what would be
  touched (and, for a re-send, whether each task can be).
- Recorded in the audit whatever the outcome, with the ids of every task touched
  (``task_ids``; a re-send also ``new_task_ids``), not clipped as other parameters are.
- Re-send publishes the task again (a new id) with its original arguments, read back from the
  ``args``/``kwargs`` the task-sent or task-received event carried (celery's ``repr`` of them):
  only when that text is the whole value (Python literals, not cut at celery's
  ``argsrepr_maxsize`` nor at ``POLLEN_MAX_FIELD_BYTES``); otherwise the task is left alone
  and its ``reason`` says why; so is a task whose arguments were redacted. It goes to the
  queue its task-sent named, else where the app routes the name.
"""

from __future__ import annotations

import ast
from typing import Any

import msgspec
from aiohttp import web
from multidict import MultiDict

from services.api import params
from services.api.context import Context, ctx
from services.api.control.audit import IDS_KEY, Body, audited
from services.api.control.resource import Control
from services.api.control.tasks import signal
from services.api.errors import bad_param
from services.api.openapi import CONTROL_ERRORS, Spec, json_body, operation, param
from services.api.query import CursorError
from services.api.tasks import client_gone, parse_task_query, task_query_params, walk
from shared.redaction import MARKER_TEXT

_decode = msgspec.json.decode
_routes = web.RouteTableDef()
#: celery's ``app.amqp.argsrepr_maxsize`` and ``kwargsrepr_maxsize``: the length past which
#: it cuts the text of a task's arguments in its events (a string ends in '...' inside its
#: quotes, a container with an ``...`` element: both still literals).
CELERY_REPR_MAXSIZE = 1024
CUT = "arguments not recorded in full (cut short, or not Python literals)"
REDACTED = "arguments redacted (POLLEN_REDACT_KEYS or POLLEN_REDACT_FIELDS)"


def original_call(
    task: dict[str, Any],
) -> tuple[list[Any] | tuple[Any, ...], dict[str, Any]] | str:
    """The task's arguments as it was called, or why they cannot be had."""
    texts = task.get("args"), task.get("kwargs")
    if not all(isinstance(t, str) for t in texts):
        return "no arguments recorded (no task-sent or task-received event seen)"
    if any(MARKER_TEXT in t for t in texts):  # type: ignore[operator]
        # published again, the marker would be the argument
        return REDACTED
    try:
        args, kwargs = (ast.literal_eval(t) for t in texts)  # type: ignore[arg-type]
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return CUT
    for text, value in zip(texts, (args, kwargs), strict=True):
        if _cut(value, len(text) >= CELERY_REPR_MAXSIZE):  # type: ignore[arg-type]
            return CUT
    # a tuple stays one, so the new task's events show the same text
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "arguments not recorded as a list and a dict"
    return args, kwargs


def _cut(value: Any, long: bool) -> bool:
    """Whether celery's ``saferepr`` may have cut ``value``'s text: it holds an ``...``, or the
    text is ``long`` and a string in it ends in '...'."""
    if value is Ellipsis:
        return True
    if isinstance(value, str):
        return long and value.endswith("...")
    if isinstance(value, list | tuple | set | frozenset):
        return any(_cut(v, long) for v in value)
    if isinstance(value, dict):
        return any(_cut(k, long) or _cut(v, long) for k, v in value.items())
    return False


async def selected(
    request: web.Request, c: Context, args: MultiDict[str], cap: int
) -> tuple[list[Any], bool]:
    """The first ``cap`` tasks of the query ``args`` give (query string and form alike), as
    ``/api/task/info`` objects, and whether more matched."""
    query, _ = parse_task_query(request, c.settings.max_page, args)
    out: list[Any] = []
    try:
        async for page in walk(c, query, lambda: not client_gone(request), cap + 1):
            out.extend(_decode(raw) for raw in page)
    except CursorError as exc:
        raise bad_param("cursor", str(exc)) from None
    return out[:cap], len(out) > cap


def _cap(c: Context, args: MultiDict[str]) -> int:
    most = c.settings.bulk_max
    cap = params.integer(args, "limit", most, minimum=1)
    assert cap is not None
    if cap > most:
        raise bad_param("limit", f"at most {most} (POLLEN_BULK_MAX)")
    return cap


def _summary(task: dict[str, Any]) -> dict[str, Any]:
    return {k: task.get(k) for k in ("uuid", "name", "state", "worker")}


@_routes.post("/api/tasks/bulk/revoke")
@audited("tasks.bulk_revoke", "")
async def bulk_revoke(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    c = ctx(request)
    dry_run = params.boolean(args, "dry_run", True)
    terminate = params.boolean(args, "terminate", False)
    sig = signal(args)
    tasks, capped = await selected(request, c, args, _cap(c, args))
    ids = [t["uuid"] for t in tasks]
    if not dry_run and ids:
        # one broadcast for them all: every worker adds them to its revoked set
        await ctl.run(ctl.app.control.revoke, ids, terminate=terminate, signal=sig)
        request[IDS_KEY] = {"task_ids": ids}
    return {
        "action": "revoke",
        "dry_run": dry_run,
        "terminate": terminate,
        "signal": sig if terminate else None,
        "matched": len(tasks),
        "capped": capped,
        "revoked": 0 if dry_run else len(ids),
        "tasks": [_summary(t) for t in tasks],
    }


async def _queues(c: Context, ids: list[str]) -> list[str | None]:
    """The queue each task's task-sent named (Pollen keeps it as the task's ``queue``)."""
    if not ids:
        return []
    pipe = c.redis.pipeline(transaction=False)
    for uuid in ids:
        pipe.hget(c.keys.shard_for(uuid).task(uuid), "queue")
    out: list[str | None] = []
    for raw in await pipe.execute():
        value = _decode(raw) if raw else None
        out.append(value if isinstance(value, str) and value else None)
    return out


@_routes.post("/api/tasks/bulk/resend")
@audited("tasks.bulk_resend", "")
async def bulk_resend(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    c = ctx(request)
    dry_run = params.boolean(args, "dry_run", True)
    tasks, capped = await selected(request, c, args, _cap(c, args))
    queues = await _queues(c, [t["uuid"] for t in tasks])
    rows: list[dict[str, Any]] = []
    old: list[str] = []
    new: list[str] = []
    try:
        for task, queue in zip(tasks, queues, strict=True):
            row = {**_summary(task), "queue": queue, "resend": False, "reason": None}
            call = original_call(task)
            if not task.get("name"):
                row["reason"] = "task name unknown"
            elif isinstance(call, str):
                row["reason"] = call
            else:
                row["resend"] = True
                if not dry_run:
                    options = {"queue": queue} if queue else {}
                    sent = await ctl.run(
                        ctl.app.send_task, task["name"], args=call[0], kwargs=call[1], **options
                    )
                    row["new_uuid"] = sent.id
                    old.append(task["uuid"])
                    new.append(sent.id)
            rows.append(row)
    finally:
        # recorded even when the broker failed part way: what was sent is in the audit
        if old:
            request[IDS_KEY] = {"task_ids": old, "new_task_ids": new}
    return {
        "action": "resend",
        "dry_run": dry_run,
        "matched": len(tasks),
        "capped": capped,
        "resendable": sum(1 for r in rows if r["resend"]),
        "resent": len(new),
        "tasks": rows,
    }


routes = list(_routes)

_COMMON = [
    param(
        "dry_run",
        "false to act; otherwise (the default) only list what would be touched",
        {"type": "boolean"},
    ),
    param(
        "limit",
        "at most this many tasks, in the query's order (default and most POLLEN_BULK_MAX)",
        {"type": "integer", "minimum": 1},
    ),
    *task_query_params(),
]
_ANSWER = (
    "action, dry_run, matched (tasks selected), capped (more matched than limit), tasks "
    "({uuid, name, state, worker}, in the query's order)"
)
openapi_paths: Spec = {
    "/api/tasks/bulk/revoke": operation(
        "post",
        "Revoke (optionally terminate) every task of an /api/tasks query, capped; a dry run "
        "by default (Pollen)",
        [
            *_COMMON,
            param("terminate", "also stop the tasks running now", {"type": "boolean"}),
            param("signal", "signal for terminate (default SIGTERM)"),
        ],
        json_body(f"{_ANSWER}; terminate, signal, revoked (0 for a dry run)"),
        CONTROL_ERRORS,
    ),
    "/api/tasks/bulk/resend": operation(
        "post",
        "Publish every task of an /api/tasks query again with its original arguments, "
        "capped; a dry run by default (Pollen)",
        _COMMON,
        json_body(
            f"{_ANSWER}, each with queue, resend (its arguments were recorded in full), "
            "reason (when not) and new_uuid (once sent); resendable, resent"
        ),
        CONTROL_ERRORS,
    ),
}
