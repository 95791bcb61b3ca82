"""OpenAPI paths of the control endpoints (``services/api/control.py``), merged by the app."""

from __future__ import annotations

from services.api.openapi import ERROR, ERRORS, Spec
from services.api.openapi import json_body as _json
from services.api.openapi import param as _param

_MESSAGE = {"type": "object", "properties": {"message": {"type": "string"}}}
_RESULT = {
    "type": "object",
    "properties": {
        "task-id": {"type": "string"},
        "state": {"type": "string"},
        "result": {},
        "traceback": {"type": ["string", "null"]},
    },
}


_COMMON = {
    **ERRORS,
    "403": _json("read-only API or credential, or the worker refused (reason given)", ERROR),
    "503": _json("broker, result backend or Redis unavailable", ERROR),
}
_WORKER = _param("name", "worker hostname, known from its events or inspect answers", where="path")
_INT = {"type": "integer"}
_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": "args, kwargs and apply_async options: task_id, countdown, eta, "
                "expires, queue, routing_key, exchange, priority, headers, time_limit, "
                "soft_time_limit, shadow (apply: also timeout)",
                "properties": {"args": {"type": "array"}, "kwargs": {"type": "object"}},
            }
        }
    },
}


def _post(summary: str, params: list[Spec], ok: Spec, extra: Spec | None = None) -> Spec:
    responses = {"200": ok, **_COMMON, **(extra or {})}
    return {"post": {"summary": summary, "parameters": params, "responses": responses}}


def _worker_op(summary: str, params: list[Spec] | None = None) -> Spec:
    return _post(
        summary,
        [_WORKER, *(params or [])],
        _json("done", _MESSAGE),
        {
            "404": _json("unknown worker", ERROR),
            "504": _json("the worker did not answer within POLLEN_INSPECT_TIMEOUT", ERROR),
        },
    )


def _publish(summary: str, answer: str) -> Spec:
    spec = _post(
        summary,
        [_param("name", "task name", where="path")],
        _json(answer, _RESULT),
        {"404": _json("no worker registered this task and no event named it", ERROR)},
    )
    spec["post"]["requestBody"] = _BODY
    return spec


PATHS: Spec = {
    "/api/worker/shutdown/{name}": _worker_op("Shut down a worker"),
    "/api/worker/pool/restart/{name}": _worker_op("Restart a worker's pool"),
    "/api/worker/pool/grow/{name}": _worker_op(
        "Grow a worker's pool", [_param("n", "processes to add (default 1)", _INT)]
    ),
    "/api/worker/pool/shrink/{name}": _worker_op(
        "Shrink a worker's pool", [_param("n", "processes to remove (default 1)", _INT)]
    ),
    "/api/worker/pool/autoscale/{name}": _worker_op(
        "Set a worker's autoscale bounds",
        [_param("min", "minimum processes", _INT), _param("max", "maximum processes", _INT)],
    ),
    "/api/worker/queue/add-consumer/{name}": _worker_op(
        "Start consuming from a queue", [_param("queue", "queue name")]
    ),
    "/api/worker/queue/cancel-consumer/{name}": _worker_op(
        "Stop consuming from a queue", [_param("queue", "queue name")]
    ),
    "/api/task/apply/{name}": _publish(
        "Run a task and wait for its result (at most POLLEN_RESULT_TIMEOUT)",
        "task-id, state and, when ready, result (and traceback)",
    ),
    "/api/task/async-apply/{name}": _publish(
        "Send a task registered on a worker", "task-id (and state with a result backend)"
    ),
    "/api/task/send-task/{name}": _publish(
        "Send a task by name", "task-id (and state with a result backend)"
    ),
    "/api/task/result/{uuid}": {
        "get": {
            "summary": "A task's result from the result backend",
            "parameters": [
                _param("uuid", "task id", where="path"),
                _param("timeout", "seconds to wait for it (capped)", {"type": "number"}),
            ],
            "responses": {"200": _json("task-id, state, result", _RESULT), **_COMMON},
        }
    },
    "/api/task/abort/{uuid}": _post(
        "Abort a running AbortableTask",
        [_param("uuid", "task id", where="path")],
        _json("done", _MESSAGE),
    ),
    "/api/task/revoke/{uuid}": _post(
        "Revoke a task",
        [
            _param("uuid", "task id", where="path"),
            _param("terminate", "also terminate it if running (default false)"),
            _param("signal", "signal for terminate (default SIGTERM)"),
        ],
        _json("done", _MESSAGE),
    ),
    "/api/task/timeout/{name}": _worker_op(
        "Set a task's time limits on a worker",
        [
            _param("workername", "worker hostname"),
            _param("soft", "soft limit (s)", {"type": "number"}),
            _param("hard", "hard limit (s)", {"type": "number"}),
        ],
    ),
    "/api/task/rate-limit/{name}": _worker_op(
        "Set a task's rate limit on a worker",
        [_param("workername", "worker hostname"), _param("ratelimit", "e.g. 10/m")],
    ),
    "/api/queues/history": {
        "get": {
            "summary": "Per-minute queue lengths sampled by the enabler, oldest first",
            "parameters": [
                _param("minutes", "entries (default 60, max POLLEN_QUEUE_HISTORY)", _INT)
            ],
            "responses": {
                "200": _json(
                    "history: [{time (minute start), queues: {name: messages}}]",
                    {"type": "object", "properties": {"history": {"type": "array"}}},
                ),
                **_COMMON,
            },
        }
    },
    "/api/audit": {
        "get": {
            "summary": "Control calls, newest first: who, what, when, reply",
            "parameters": [
                _param("limit", "entries (1-1000, default 100)", _INT),
                _param("before", "an entry id: only older entries"),
            ],
            "responses": {
                "200": _json(
                    "entries and the id to pass as before= for the next page",
                    {
                        "type": "object",
                        "properties": {
                            "entries": {"type": "array", "items": {"type": "object"}},
                            "next": {"type": ["string", "null"]},
                        },
                    },
                ),
                **_COMMON,
            },
        }
    },
}
# the two task-name endpoints take the task name in {name}, not a worker
for _path in ("/api/task/timeout/{name}", "/api/task/rate-limit/{name}"):
    PATHS[_path]["post"]["parameters"][0] = _param("name", "task name", where="path")
