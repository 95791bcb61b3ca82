"""Flower's task endpoints: revoke, abort, time and rate limits, and publishing (apply,
async-apply, send-task) with its result."""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec
from aiohttp import web
from celery import Celery
from multidict import MultiDict

from services.api import params
from services.api.control.audit import BODY_KEY, SENT_KEY, Body, audited
from services.api.control.resource import CONTROL, Control
from services.api.control.workers import MESSAGE, WORKER_ERRORS, refused, worker_command
from services.api.errors import bad_param, not_found, unavailable
from services.api.openapi import CONTROL_ERRORS, ERROR, NUMBER, Spec, json_body, operation, param

#: Flower's date format for ``eta`` and ``expires``; ISO 8601 is accepted too.
DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
#: ``apply_async`` options a publishing call may pass, with their types.
TASK_OPTIONS: dict[str, tuple[type, ...]] = {
    "task_id": (str,),
    "countdown": (int, float),
    "eta": (str,),
    "expires": (int, float, str),
    "queue": (str,),
    "routing_key": (str,),
    "exchange": (str,),
    "priority": (int,),
    "headers": (dict,),
    "time_limit": (int, float),
    "soft_time_limit": (int, float),
    "shadow": (str,),
}

_routes = web.RouteTableDef()


def signal(args: Mapping[str, str]) -> str:
    """``signal`` for a terminating revoke: a name (``TERM``, ``SIGTERM``) or a number."""
    raw = args.get("signal") or "SIGTERM"
    name = raw.upper()
    if name.isdigit():
        try:
            return signals.Signals(int(name)).name
        except ValueError:
            raise bad_param("signal", f"unknown signal: {raw!r}") from None
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in signals.Signals.__members__:
        raise bad_param("signal", f"unknown signal: {raw!r}")
    return name


@_routes.post("/api/task/revoke/{uuid}")
@audited("task.revoke", "uuid")
async def task_revoke(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    task_id = request.match_info["uuid"]
    terminate = params.boolean(args, "terminate", False)
    sig = signal(args)
    await ctl.run(ctl.app.control.revoke, task_id, terminate=terminate, signal=sig)
    return {"message": f"Revoked '{task_id}'"}


@_routes.post("/api/task/abort/{uuid}")
@audited("task.abort", "uuid")
async def task_abort(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    from celery.contrib.abortable import AbortableAsyncResult

    task_id = request.match_info["uuid"]
    require_backend(ctl)
    result = AbortableAsyncResult(task_id, app=ctl.app)
    await ctl.run(result.abort)
    return {"message": f"Aborted '{task_id}'"}


@_routes.post("/api/task/timeout/{name}")
@audited("task.time_limit", "name")
async def task_timeout(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    task_name = request.match_info["name"]
    worker = params.required(args, "workername")
    hard, soft = params.duration(args, "hard"), params.duration(args, "soft")
    answer = await worker_command(
        ctl, worker, "time_limit", {"task_name": task_name, "hard": hard, "soft": soft}
    )
    if "ok" not in answer:
        raise refused(answer, "Failed to set timeouts")
    return {"message": answer["ok"]}


@_routes.post("/api/task/rate-limit/{name}")
@audited("task.rate_limit", "name")
async def task_rate_limit(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    task_name = request.match_info["name"]
    worker = params.required(args, "workername")
    rate = params.required(args, "ratelimit")
    answer = await worker_command(
        ctl, worker, "rate_limit", {"task_name": task_name, "rate_limit": rate}
    )
    if "ok" not in answer:
        raise refused(answer, "Failed to set rate limit")
    return {"message": answer["ok"]}


def require_backend(ctl: Control) -> None:
    if not ctl.has_backend:
        raise unavailable(
            "result backend is not configured (POLLEN_RESULT_BACKEND or the Celery app's)"
        )


async def task_body(request: web.Request) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """``args``, ``kwargs`` and the ``apply_async`` options of a JSON body (Flower's format)."""
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw) if raw.strip() else {}
    except msgspec.DecodeError as exc:
        raise bad_param("body", f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_param("body", "must be a JSON object")
    request[BODY_KEY] = dict(body)  # as sent, for the audit entry
    args = body.pop("args", [])
    kwargs = body.pop("kwargs", {})
    if not isinstance(args, list):
        raise bad_param("args", "must be an array")
    if not isinstance(kwargs, dict):
        raise bad_param("kwargs", "must be an object")
    return args, kwargs, body


def _date(name: str, value: str) -> datetime:
    for parse in (lambda v: datetime.strptime(v, DATE_FORMAT), datetime.fromisoformat):
        with contextlib.suppress(ValueError):
            return parse(value)
    raise bad_param(name, f"not a date ({DATE_FORMAT} or ISO 8601): {value!r}")


#: Message headers Celery sets itself (protocol 2): a caller's ``headers`` may not replace
#: them, or the task that runs would differ from the one audited.
CELERY_HEADERS = frozenset(Celery(set_as_current=False).amqp.as_task_v2("id", "name").headers)


def _event_or_control(ctl: Control, name: str) -> bool:
    """Whether an exchange, queue or routing key carries Celery's events or control messages
    (a published task must not reach them: a caller could forge events or commands)."""
    event = ctl.app.conf.event_exchange
    control = ctl.app.conf.control_exchange
    return (
        name in (event, f"{control}.pidbox", f"reply.{control}.pidbox")
        or name.startswith((f"{event}.", "celeryev."))
        or name.endswith(".pidbox")
        or (bool(ctl.settings.event_queue) and name == ctl.settings.event_queue)
    )


def task_options(ctl: Control, options: dict[str, Any]) -> dict[str, Any]:
    """Validated ``apply_async`` options; unknown or unsafe ones are a 400 naming them."""
    out: dict[str, Any] = {}
    for name, raw in options.items():
        types = TASK_OPTIONS.get(name)
        if types is None:
            raise bad_param(name, "unknown option")
        if raw is None:
            continue
        if not isinstance(raw, types) or isinstance(raw, bool):
            raise bad_param(name, f"expected {' or '.join(t.__name__ for t in types)}")
        value: Any = raw
        if name == "eta":
            value = _date(name, str(value))
        elif name == "expires" and isinstance(value, str):
            try:
                value = params.seconds(name, float(value))
            except ValueError:
                value = _date(name, value)
        elif name in ("countdown", "expires"):
            value = params.seconds(name, value, negative=True)
        elif name in ("time_limit", "soft_time_limit"):
            value = params.seconds(name, value)
        elif name == "priority" and not 0 <= value <= 255:
            raise bad_param(name, "must be between 0 and 255")
        elif name == "headers":
            clash = sorted(str(k) for k in value if str(k).lower() in CELERY_HEADERS)
            if clash:
                raise bad_param(
                    name, f"may not set Celery's own message headers: {', '.join(clash)}"
                )
        elif name in ("exchange", "queue", "routing_key") and _event_or_control(ctl, str(value)):
            raise bad_param(name, f"{value!r} carries Celery's events or control messages")
        out[name] = value
    return out


async def known_task(ctl: Control, name: str) -> None:
    """404 unless some worker registered ``name`` or its events were seen (Flower checks the
    task exists in its app; Pollen has no user code, so it asks what workers said)."""
    pipe = ctl.redis.pipeline(transaction=False)
    for shard in ctl.keys.all_shards:
        pipe.sismember(shard.names, name)
    if any(await pipe.execute()):
        return
    hosts = await ctl.redis.zrange(ctl.keys.inspected, 0, -1)
    if hosts:
        pipe = ctl.redis.pipeline(transaction=False)
        for host in hosts:
            pipe.hget(ctl.keys.inspect(host.decode()), "registered")
        for raw in await pipe.execute():
            if raw is not None and name in (msgspec.json.decode(raw) or ()):
                return
    raise not_found(f"Unknown task '{name}'")


def _safe(value: Any) -> Any:
    try:
        msgspec.json.encode(value)
    except (TypeError, msgspec.EncodeError):
        return repr(value)
    return value


def _read_result(result: Any, with_result: bool) -> dict[str, Any]:
    response: dict[str, Any] = {"task-id": result.id, "state": result.state}
    if with_result and result.state in ("SUCCESS", "FAILURE", "REVOKED"):
        response["result"] = _safe(result.result)
        if result.state == "FAILURE":
            response["traceback"] = result.traceback
    return response


async def wait_result(ctl: Control, result: Any, timeout: float) -> dict[str, Any]:
    """Poll the backend until the task is ready or ``timeout`` passes; each poll is a short
    blocking call, so a long wait holds no thread of the pool."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if await ctl.run(result.ready):
            return await ctl.run(_read_result, result, True)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return await ctl.run(_read_result, result, False)
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.5)


def _timeout(value: Any, ctl: Control) -> float:
    limit = ctl.settings.result_timeout
    if value is None or value == "":
        return limit
    return min(params.seconds("timeout", value), limit)


async def publish(
    request: web.Request, ctl: Control, check_name: bool
) -> tuple[Any, dict[str, Any]]:
    name = request.match_info["name"]
    args, kwargs, raw_options = await task_body(request)
    timeout = raw_options.pop("timeout", None)
    if timeout is not None:
        _timeout(timeout, ctl)  # a bad one is a 400 before anything is sent
    options = task_options(ctl, raw_options)
    if check_name:
        await known_task(ctl, name)
    result = await ctl.run(ctl.app.send_task, name, args=args, kwargs=kwargs, **options)
    request[SENT_KEY] = {
        "task": name,
        "task_id": result.id,
        "args": args,
        "kwargs": kwargs,
        "options": {k: str(v) if isinstance(v, datetime) else v for k, v in options.items()},
    }
    return result, {"timeout": timeout}


@_routes.post("/api/task/apply/{name}")
@audited("task.apply", "name")
async def task_apply(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    require_backend(ctl)
    result, extra = await publish(request, ctl, check_name=True)
    timeout = _timeout(
        extra["timeout"] if extra["timeout"] is not None else args.get("timeout"), ctl
    )
    return await wait_result(ctl, result, timeout)


@_routes.post("/api/task/async-apply/{name}")
@audited("task.async_apply", "name")
async def task_async_apply(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    result, _ = await publish(request, ctl, check_name=True)
    return await _sent(ctl, result)


@_routes.post("/api/task/send-task/{name}")
@audited("task.send_task", "name")
async def task_send(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    result, _ = await publish(request, ctl, check_name=False)
    return await _sent(ctl, result)


async def _sent(ctl: Control, result: Any) -> Body:
    response: dict[str, Any] = {"task-id": result.id}
    if ctl.has_backend:
        response["state"] = await ctl.run(lambda: result.state)
    return response


@_routes.get("/api/task/result/{uuid}")
async def task_result(request: web.Request) -> web.StreamResponse:
    from celery.result import AsyncResult

    ctl = request.app[CONTROL]
    require_backend(ctl)
    raw = request.query.get("timeout")
    result = AsyncResult(request.match_info["uuid"], app=ctl.app)
    if raw:
        body = await wait_result(ctl, result, _timeout(raw, ctl))
    else:
        body = await ctl.run(_read_result, result, True)
    return web.json_response(body)


RESULT = {
    "type": "object",
    "properties": {
        "task-id": {"type": "string"},
        "state": {"type": "string"},
        "result": {},
        "traceback": {"type": ["string", "null"]},
    },
}
TASK_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": "args, kwargs and apply_async options: "
                + ", ".join(TASK_OPTIONS)
                + " (apply: also timeout)",
                "properties": {"args": {"type": "array"}, "kwargs": {"type": "object"}},
            }
        }
    },
}
TASK_NAME = param("name", "task name", where="path")
TASK_ID = param("uuid", "task id", where="path")
UNKNOWN_TASK = {"404": json_body("no worker registered this task and no event named it", ERROR)}


def _publishing(summary: str, answer: str) -> Spec:
    return operation(
        "post",
        summary,
        [TASK_NAME],
        json_body(answer, RESULT),
        {**CONTROL_ERRORS, **UNKNOWN_TASK},
        requestBody=TASK_BODY,
    )


routes = list(_routes)
openapi_paths: Spec = {
    "/api/task/apply/{name}": _publishing(
        "Run a task and wait for its result (at most POLLEN_RESULT_TIMEOUT)",
        "task-id, state and, when ready, result (and traceback)",
    ),
    "/api/task/async-apply/{name}": _publishing(
        "Send a task registered on a worker", "task-id (and state with a result backend)"
    ),
    "/api/task/send-task/{name}": _publishing(
        "Send a task by name", "task-id (and state with a result backend)"
    ),
    "/api/task/result/{uuid}": operation(
        "get",
        "A task's result from the result backend",
        [TASK_ID, param("timeout", "seconds to wait for it (capped)", NUMBER)],
        json_body("task-id, state, result", RESULT),
        CONTROL_ERRORS,
    ),
    "/api/task/abort/{uuid}": operation(
        "post",
        "Abort a running AbortableTask",
        [TASK_ID],
        json_body("done", MESSAGE),
        CONTROL_ERRORS,
    ),
    "/api/task/revoke/{uuid}": operation(
        "post",
        "Revoke a task",
        [
            TASK_ID,
            param("terminate", "also terminate it if running (default false)"),
            param("signal", "signal for terminate (default SIGTERM)"),
        ],
        json_body("done", MESSAGE),
        CONTROL_ERRORS,
    ),
    "/api/task/timeout/{name}": operation(
        "post",
        "Set a task's time limits on a worker",
        [
            TASK_NAME,
            param("workername", "worker hostname"),
            param("soft", "soft limit (s)", NUMBER),
            param("hard", "hard limit (s)", NUMBER),
        ],
        json_body("done", MESSAGE),
        WORKER_ERRORS,
    ),
    "/api/task/rate-limit/{name}": operation(
        "post",
        "Set a task's rate limit on a worker",
        [TASK_NAME, param("workername", "worker hostname"), param("ratelimit", "e.g. 10/m")],
        json_body("done", MESSAGE),
        WORKER_ERRORS,
    ),
}
