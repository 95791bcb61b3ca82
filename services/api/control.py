"""Worker and task control through the API, on Flower's paths, with an audit trail.

The app factory registers ``routes``, ``openapi_paths`` and the ``on_startup``/``on_cleanup``
hooks. Every
mutating call goes through ``require_control`` (403 when ``POLLEN_READ_ONLY`` or the caller's
credential is read-only) and is recorded in ``<ns>:audit`` whatever its outcome: who (the
credential's name), what (action, target, parameters), when, and the answer (status and body).

A worker is known when its events reached Redis or the enabler has inspect answers from it;
no inspect cache has to hold it. Blocking Celery calls run in a bounded thread pool
(``POLLEN_CONTROL_CONCURRENCY``); a broker or result backend outage answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal as signals
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from celery import Celery
from multidict import MultiDict, MultiDictProxy

from services.api.audit import audit_entry, record_audit
from services.api.auth import principal, require_role
from services.api.context import CONTEXT
from services.api.control_openapi import PATHS as openapi_paths
from services.api.errors import ApiError, bad_param, forbidden, not_found, unavailable
from shared.broker import broker_errors, load_app
from shared.connections import REDIS_ERRORS
from shared.inspected import history_entry
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("pollen.api.control")

T = TypeVar("T")

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
#: Largest magnitude of a delay or limit in seconds (ten years): beyond it Celery's date
#: arithmetic overflows.
MAX_SECONDS = 10 * 365 * 86400
#: Largest ``n``, ``min`` or ``max`` of a pool command.
MAX_POOL = 10_000
#: Parameters never recorded in the audit: credentials.
SECRET_PARAMS = frozenset({"token"})
#: Seconds a control call waits for a free slot of its lane before answering 503.
QUEUE_WAIT = 5.0
#: Longest text of parameters or reply kept in one audit entry.
AUDIT_TEXT_LIMIT = 2048
TRUE = {"y", "yes", "t", "true", "on", "1"}
FALSE = {"n", "no", "f", "false", "off", "0"}


@dataclass
class Control:
    """What the control endpoints share: settings, Redis, the Celery app and the thread pool."""

    settings: Settings
    redis: Any
    keys: Keys = field(init=False)
    app: Celery = field(init=False)
    executor: ThreadPoolExecutor = field(init=False)
    semaphore: asyncio.Semaphore = field(init=False)
    unverified: asyncio.Semaphore = field(init=False)
    errors: tuple[type[BaseException], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.namespace, self.settings.shards)
        self.app = load_app(self.settings, "pollen-api")
        # workers known only from events (anyone who can publish to the broker can forge
        # them) get a lane of their own, so calls that wait for them cannot starve the others
        unverified = max(1, self.settings.control_concurrency // 4)
        self.executor = ThreadPoolExecutor(
            max_workers=self.settings.control_concurrency + unverified,
            thread_name_prefix="control",
        )
        self.semaphore = asyncio.Semaphore(self.settings.control_concurrency)
        self.unverified = asyncio.Semaphore(unverified)
        errors = broker_errors(self.app)
        if self.has_backend:
            errors += tuple(getattr(self.app.backend, "connection_errors", ()) or ())
        self.errors = tuple(dict.fromkeys(errors))

    @property
    def has_backend(self) -> bool:
        """A result backend is configured (``POLLEN_RESULT_BACKEND`` or the Celery app's)."""
        return bool(self.app.conf.result_backend)

    @property
    def timeout(self) -> float:
        return self.settings.inspect_timeout

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking Celery call off the event loop; an outage is a 503."""
        return await self._run(self.semaphore, partial(fn, *args, **kwargs))

    async def run_unverified(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``run`` in the small lane of calls to workers known only from their events."""
        return await self._run(self.unverified, partial(fn, *args, **kwargs))

    async def _run(self, lane: asyncio.Semaphore, call: Callable[[], T]) -> T:
        try:
            await asyncio.wait_for(lane.acquire(), QUEUE_WAIT)
        except TimeoutError:
            raise ApiError(
                503, "too many control calls in progress: try again", {"Retry-After": "1"}
            ) from None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, call)
        except self.errors as exc:
            log.warning("broker or result backend unavailable: %r", exc)
            raise unavailable(f"broker or result backend unavailable: {exc}") from exc
        finally:
            lane.release()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        # kombu's connection pools are process-wide, keyed by broker URL: closing them would
        # break other apps on the same broker; celery's close() only drops the reference
        self.app.close()


CONTROL = web.AppKey("pollen.control", Control)


async def on_startup(app: web.Application) -> None:
    """Called by the app factory: the Control shares the app's settings and Redis client."""
    c = app[CONTEXT]
    app[CONTROL] = Control(c.settings, c.redis)


async def on_cleanup(app: web.Application) -> None:
    if CONTROL in app:
        app[CONTROL].close()


# --- parameters ----------------------------------------------------------------------------------


async def arguments(request: web.Request) -> MultiDict[str]:
    """Query string and form body together, as Flower's ``get_argument`` reads them."""
    merged: MultiDict[str] = MultiDict(request.query)
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form: MultiDictProxy[Any] = await request.post()
        for key, value in form.items():
            if isinstance(value, str):
                merged.add(key, value)
    return merged


def int_arg(
    args: Mapping[str, str], name: str, default: int | None = None, maximum: int = MAX_POOL
) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        if default is None:
            raise bad_param(name, "required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_param(name, f"not an integer: {raw!r}") from None
    if abs(value) > maximum:
        raise bad_param(name, f"must be at most {maximum}")
    return value


def seconds(name: str, value: Any, *, negative: bool = False) -> float:
    """A finite number of seconds within ``MAX_SECONDS`` (400 otherwise)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise bad_param(name, f"not a number: {value!r}") from None
    if not math.isfinite(number) or abs(number) > MAX_SECONDS:
        raise bad_param(name, f"must be a finite number of seconds within {MAX_SECONDS}")
    if number < 0 and not negative:
        raise bad_param(name, "must not be negative")
    return number


def float_arg(args: Mapping[str, str], name: str) -> float | None:
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    return seconds(name, raw)


def bool_arg(args: Mapping[str, str], name: str, default: bool) -> bool:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise bad_param(name, f"not a boolean: {raw!r}")


def str_arg(args: Mapping[str, str], name: str) -> str:
    raw = args.get(name)
    if not raw:
        raise bad_param(name, "required")
    return raw


def signal_arg(args: Mapping[str, str]) -> str:
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


# --- audit ---------------------------------------------------------------------------------------


def _clip(value: Any) -> Any:
    text = msgspec.json.encode(value, enc_hook=repr)
    if len(text) <= AUDIT_TEXT_LIMIT:
        return value
    return text[:AUDIT_TEXT_LIMIT].decode(errors="replace") + "..."


Body = dict[str, Any]
Action = Callable[[web.Request, Control, MultiDict[str]], Awaitable[Body]]


def audited(
    action: str, target: str, role: str = "operator"
) -> Callable[[Action], Callable[[web.Request], Any]]:
    """A mutating endpoint: the caller's role checked (``role`` at least), the call recorded
    whatever its outcome."""

    def wrap(fn: Action) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            ctl = request.app[CONTROL]
            started = time.time()
            status: int = 500
            reply: Any = None
            args: MultiDict[str] = MultiDict()
            try:
                args = await arguments(request)
                require_role(request, ctl.settings, role)
                body = await fn(request, ctl, args)
                status, reply = 200, body
                return web.json_response(body)
            except ApiError as exc:
                status, reply = exc.status, {"error": exc.message}
                raise
            except web.HTTPException as exc:
                status, reply = exc.status, {"error": exc.reason}
                raise
            except BaseException as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
                raise
            finally:
                params: dict[str, Any] = {k: v for k, v in args.items() if k not in SECRET_PARAMS}
                extra = request.get(_BODY_KEY)
                if extra is not None:
                    params["body"] = extra
                sent = request.get(_SENT_KEY)
                entry = {
                    "time": started,
                    "who": principal(request).name,
                    "role": principal(request).role,
                    "remote": request.remote,
                    "action": action,
                    "target": request.match_info.get(target, ""),
                    "params": _clip(params),
                    "status": status,
                    "reply": _clip(reply),
                }
                if sent is not None:
                    entry["sent"] = _clip(sent)
                await _record(ctl, entry)

        handler.__name__ = fn.__name__
        return handler

    return wrap


_BODY_KEY = web.RequestKey("pollen.control.body", object)
#: The message a publishing call really sent: task name, id, args, kwargs and options.
_SENT_KEY = web.RequestKey("pollen.control.sent", object)


async def _record(ctl: Control, entry: dict[str, Any]) -> None:
    try:
        await record_audit(ctl.redis, ctl.keys, entry, ctl.settings.audit_maxlen)
    except REDIS_ERRORS as exc:
        # the call happened: keep the record in the log at least
        log.warning("audit entry not stored (%r): %s", exc, msgspec.json.encode(entry).decode())


# --- workers -------------------------------------------------------------------------------------


async def known_worker(ctl: Control, name: str) -> bool:
    """404 unless the worker is known from its events or from the enabler's inspect data;
    whether it answered the enabler (verified: not only named in events)."""
    shard = ctl.keys.shard_for(name)
    pipe = ctl.redis.pipeline(transaction=False)
    pipe.exists(shard.worker(name))
    pipe.zscore(ctl.keys.inspected, name)
    from_events, inspected = await pipe.execute()
    if not from_events and inspected is None:
        raise not_found(f"Unknown worker '{name}'")
    return inspected is not None


async def worker_command(
    ctl: Control, name: str, command: str, arguments: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Broadcast ``command`` to one known worker and return its reply; 404 for an unknown
    worker, 504 when it does not answer."""
    verified = await known_worker(ctl, name)
    replies = await (ctl.run if verified else ctl.run_unverified)(
        ctl.app.control.broadcast,
        command,
        arguments=arguments or {},
        destination=[name],
        reply=True,
        timeout=ctl.timeout,
    )
    for reply in replies or ():
        if isinstance(reply, dict) and name in reply:
            answer = reply[name]
            return answer if isinstance(answer, dict) else {"ok": answer}
    raise ApiError(504, f"no reply from '{name}' within {ctl.timeout:g} s")


def refused(answer: Mapping[str, Any], what: str) -> ApiError:
    return forbidden(f"{what}: {answer.get('error', 'Unknown reason')}")


_routes = web.RouteTableDef()


@_routes.post("/api/worker/shutdown/{name}")
@audited("worker.shutdown", "name", role="admin")
async def worker_shutdown(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = request.match_info["name"]
    await known_worker(ctl, name)
    # as Flower: no reply is awaited, the worker stops before it could send one
    await ctl.run(ctl.app.control.broadcast, "shutdown", destination=[name])
    return {"message": "Shutting down!"}


@_routes.post("/api/worker/pool/restart/{name}")
@audited("worker.pool_restart", "name")
async def pool_restart(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = request.match_info["name"]
    answer = await worker_command(ctl, name, "pool_restart", {"reload": False})
    if "ok" not in answer:
        raise refused(answer, f"Failed to restart the '{name}' pool")
    return {"message": f"Restarting '{name}' worker's pool"}


@_routes.post("/api/worker/pool/grow/{name}")
@audited("worker.pool_grow", "name")
async def pool_grow(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = request.match_info["name"]
    n = int_arg(args, "n", 1)
    if n < 1:
        raise bad_param("n", "must be at least 1")
    answer = await worker_command(ctl, name, "pool_grow", {"n": n})
    if "ok" not in answer:
        raise refused(answer, f"Failed to grow '{name}' worker's pool")
    return {"message": f"Growing '{name}' worker's pool by {n}"}


@_routes.post("/api/worker/pool/shrink/{name}")
@audited("worker.pool_shrink", "name")
async def pool_shrink(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = request.match_info["name"]
    n = int_arg(args, "n", 1)
    if n < 1:
        raise bad_param("n", "must be at least 1")
    answer = await worker_command(ctl, name, "pool_shrink", {"n": n})
    if "ok" not in answer:
        raise refused(answer, f"Failed to shrink '{name}' worker's pool")
    return {"message": f"Shrinking '{name}' worker's pool by {n}"}


@_routes.post("/api/worker/pool/autoscale/{name}")
@audited("worker.pool_autoscale", "name")
async def pool_autoscale(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = request.match_info["name"]
    low, high = int_arg(args, "min"), int_arg(args, "max")
    if low < 0:
        raise bad_param("min", "must not be negative")
    if high < max(low, 1):
        raise bad_param("max", "must be at least min and at least 1")
    answer = await worker_command(ctl, name, "autoscale", {"min": low, "max": high})
    if "ok" not in answer:
        raise refused(answer, f"Failed to autoscale '{name}' worker")
    return {"message": f"Autoscaling '{name}' worker (min={low}, max={high})"}


@_routes.post("/api/worker/queue/add-consumer/{name}")
@audited("worker.add_consumer", "name")
async def add_consumer(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = request.match_info["name"]
    queue = str_arg(args, "queue")
    answer = await worker_command(ctl, name, "add_consumer", {"queue": queue})
    if "ok" not in answer:
        raise refused(answer, f"Failed to add '{queue}' consumer to '{name}' worker")
    return {"message": answer["ok"]}


@_routes.post("/api/worker/queue/cancel-consumer/{name}")
@audited("worker.cancel_consumer", "name")
async def cancel_consumer(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = request.match_info["name"]
    queue = str_arg(args, "queue")
    answer = await worker_command(ctl, name, "cancel_consumer", {"queue": queue})
    if "ok" not in answer:
        raise refused(answer, f"Failed to cancel '{queue}' consumer from '{name}' worker")
    return {"message": answer["ok"]}


# --- tasks ---------------------------------------------------------------------------------------


@_routes.post("/api/task/revoke/{uuid}")
@audited("task.revoke", "uuid")
async def task_revoke(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    task_id = request.match_info["uuid"]
    terminate = bool_arg(args, "terminate", False)
    sig = signal_arg(args)
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
    worker = str_arg(args, "workername")
    hard, soft = float_arg(args, "hard"), float_arg(args, "soft")
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
    worker = str_arg(args, "workername")
    rate = str_arg(args, "ratelimit")
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
    request[_BODY_KEY] = dict(body)  # as sent, for the audit entry
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
                value = seconds(name, float(value))
            except ValueError:
                value = _date(name, value)
        elif name in ("countdown", "expires"):
            value = seconds(name, value, negative=True)
        elif name in ("time_limit", "soft_time_limit"):
            value = seconds(name, value)
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
    return min(seconds("timeout", value), limit)


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
    request[_SENT_KEY] = {
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


# --- audit ---------------------------------------------------------------------------------------


@_routes.get("/api/audit")
async def audit(request: web.Request) -> web.StreamResponse:
    """Control calls, newest first: ``limit`` (1-1000, default 100), ``before`` (an entry id:
    older entries only). Answers ``{"entries": [...], "next": id or null}``."""
    ctl = request.app[CONTROL]
    limit = int_arg(request.query, "limit", 100)
    if not 1 <= limit <= 1000:
        raise bad_param("limit", "must be between 1 and 1000")
    before = request.query.get("before")
    high = "+"
    if before:
        if not _is_stream_id(before):
            raise bad_param("before", f"not an audit entry id: {before!r}")
        high = f"({before}"
    rows = await ctl.redis.xrevrange(ctl.keys.audit, max=high, min="-", count=limit)
    entries = [audit_entry(entry_id, fields) for entry_id, fields in rows]
    return web.json_response(
        {"entries": entries, "next": entries[-1]["id"] if len(entries) == limit else None}
    )


@_routes.get("/api/queues/history")
async def queues_history(request: web.Request) -> web.StreamResponse:
    """The enabler's per-minute queue lengths, oldest first: ``minutes`` (default 60, at most
    ``POLLEN_QUEUE_HISTORY``). Answers ``{"history": [{"time", "queues": {name: n}}]}``."""
    ctl = request.app[CONTROL]
    minutes = int_arg(request.query, "minutes", 60)
    if not 1 <= minutes <= ctl.settings.queue_history:
        raise bad_param("minutes", f"must be between 1 and {ctl.settings.queue_history}")
    rows = await ctl.redis.xrevrange(ctl.keys.queues_history, count=minutes)
    history = [history_entry(entry_id, fields) for entry_id, fields in reversed(rows)]
    return web.json_response({"history": history})


def _is_stream_id(text: str) -> bool:
    ms, _, seq = text.partition("-")
    # ASCII digits only, each part within 64 bits: Redis refuses anything else (a 500)
    return all(p.isascii() and p.isdigit() and int(p) < 2**64 for p in (ms, seq or "0"))


#: The control endpoints, for the app factory.
routes: list[web.AbstractRouteDef] = list(_routes)
__all__ = ["CONTROL", "Control", "on_cleanup", "on_startup", "openapi_paths", "routes"]
