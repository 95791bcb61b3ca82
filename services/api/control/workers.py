"""Flower's worker endpoints, ``POST /api/worker/<command>/{name}``: one table, each row a
Celery control command with its parameters, its answer and its OpenAPI description."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import MultiDict

from services.api import params
from services.api.control.audit import Body, audited
from services.api.control.resource import Control
from services.api.errors import ApiError, bad_param, forbidden, not_found
from services.api.openapi import CONTROL_ERRORS, ERROR, INTEGER, Spec, json_body, operation, param

#: Largest ``n``, ``min`` or ``max`` of a pool command.
MAX_POOL = 10_000
MESSAGE = {"type": "object", "properties": {"message": {"type": "string"}}}
#: What an endpoint addressing one worker may answer.
WORKER_ERRORS = {
    **CONTROL_ERRORS,
    "404": json_body("unknown worker", ERROR),
    "504": json_body("the worker did not answer within POLLEN_INSPECT_TIMEOUT", ERROR),
}


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


Read = Callable[[Mapping[str, str]], dict[str, Any]]


def _nothing(args: Mapping[str, str]) -> dict[str, Any]:
    return {}


def _no_reload(args: Mapping[str, str]) -> dict[str, Any]:
    return {"reload": False}


def _processes(args: Mapping[str, str]) -> dict[str, Any]:
    return {"n": params.integer(args, "n", 1, minimum=1, maximum=MAX_POOL)}


def _bounds(args: Mapping[str, str]) -> dict[str, Any]:
    low = params.integer(args, "min", None, minimum=0, maximum=MAX_POOL, needed=True)
    high = params.integer(args, "max", None, minimum=0, maximum=MAX_POOL, needed=True)
    assert low is not None and high is not None
    if high < max(low, 1):
        raise bad_param("max", "must be at least min and at least 1")
    return {"min": low, "max": high}


def _queue(args: Mapping[str, str]) -> dict[str, Any]:
    return {"queue": params.required(args, "queue")}


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """``POST /api/worker/<path>/{name}``: Celery's control ``command`` sent to that worker."""

    path: str
    #: the audit trail's action: ``worker.<action>``
    action: str
    command: str
    summary: str
    #: the command's arguments, from the request's parameters (a 400 names a bad one)
    read: Read
    #: the 403 when the worker refuses, and the answer; formatted with ``name``, the
    #: arguments and ``ok`` (the worker's own answer)
    failed: str
    done: str
    parameters: tuple[Spec, ...] = ()
    role: str = "operator"
    #: False: no reply is awaited (as Flower: the worker stops before it could send one)
    reply: bool = True


COMMANDS = (
    WorkerCommand(
        "shutdown", "shutdown", "shutdown", "Shut down a worker", _nothing, "", "Shutting down!",
        role="admin", reply=False,
    ),
    WorkerCommand(
        "pool/restart", "pool_restart", "pool_restart", "Restart a worker's pool", _no_reload,
        "Failed to restart the '{name}' pool", "Restarting '{name}' worker's pool",
    ),
    WorkerCommand(
        "pool/grow", "pool_grow", "pool_grow", "Grow a worker's pool", _processes,
        "Failed to grow '{name}' worker's pool", "Growing '{name}' worker's pool by {n}",
        (param("n", "processes to add (default 1)", INTEGER),),
    ),
    WorkerCommand(
        "pool/shrink", "pool_shrink", "pool_shrink", "Shrink a worker's pool", _processes,
        "Failed to shrink '{name}' worker's pool", "Shrinking '{name}' worker's pool by {n}",
        (param("n", "processes to remove (default 1)", INTEGER),),
    ),
    WorkerCommand(
        "pool/autoscale", "pool_autoscale", "autoscale", "Set a worker's autoscale bounds",
        _bounds, "Failed to autoscale '{name}' worker",
        "Autoscaling '{name}' worker (min={min}, max={max})",
        (param("min", "minimum processes", INTEGER), param("max", "maximum processes", INTEGER)),
    ),
    WorkerCommand(
        "queue/add-consumer", "add_consumer", "add_consumer", "Start consuming from a queue",
        _queue, "Failed to add '{queue}' consumer to '{name}' worker", "{ok}",
        (param("queue", "queue name"),),
    ),
    WorkerCommand(
        "queue/cancel-consumer", "cancel_consumer", "cancel_consumer",
        "Stop consuming from a queue", _queue,
        "Failed to cancel '{queue}' consumer from '{name}' worker", "{ok}",
        (param("queue", "queue name"),),
    ),
)  # fmt: skip


def endpoint(cmd: WorkerCommand) -> Callable[[web.Request], Any]:
    async def run(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
        name = request.match_info["name"]
        arguments = cmd.read(args)
        if not cmd.reply:
            await known_worker(ctl, name)
            await ctl.run(ctl.app.control.broadcast, cmd.command, destination=[name])
            return {"message": cmd.done.format(name=name, **arguments)}
        answer = await worker_command(ctl, name, cmd.command, arguments)
        if "ok" not in answer:
            raise refused(answer, cmd.failed.format(name=name, **arguments))
        return {"message": cmd.done.format(name=name, ok=answer["ok"], **arguments)}

    run.__name__ = f"worker_{cmd.action}"
    return audited(f"worker.{cmd.action}", "name", role=cmd.role)(run)


WORKER = param("name", "worker hostname, known from its events or inspect answers", where="path")

routes = [web.post(f"/api/worker/{cmd.path}/{{name}}", endpoint(cmd)) for cmd in COMMANDS]
openapi_paths: Spec = {
    f"/api/worker/{cmd.path}/{{name}}": operation(
        "post", cmd.summary, [WORKER, *cmd.parameters], json_body("done", MESSAGE), WORKER_ERRORS
    )
    for cmd in COMMANDS
}
