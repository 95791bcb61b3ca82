"""Flower's ``/api/workers``.

Liveness (``status=1``) is celery's ``Worker.alive`` from the heartbeats the collector keeps
(``shared.readers.worker_alive``). The full form is what the enabler stores from inspect
(``<ns>:inspect:<hostname>``, read with ``shared.inspected.worker_inspect``); a worker
that has not answered an inspect yet is described by its event fields instead.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import ctx
from services.api.errors import not_found
from services.api.openapi import BOOL, ERROR, ERRORS, Spec, json_body, operation, param
from shared.inspected import worker_inspect
from shared.readers import worker_alive, worker_from_hash
from shared.workers import event_state, known_workers

_encode = msgspec.json.encode
JSON = "application/json"
#: Inspect answers that list tasks: only returned for one worker (``workername``), as Flower.
TASK_LISTS = ("active", "reserved", "scheduled", "revoked")


async def list_workers(request: web.Request) -> web.Response:
    c = ctx(request)
    # refresh is accepted for Flower clients; the enabler refreshes inspect data on its own
    params.boolean(request.query, "refresh", False)
    status = params.boolean(request.query, "status", False)
    workername = params.text(request.query, "workername")
    hosts = await known_workers(c.redis, c.keys)
    now = time.time()
    if status:
        states = await event_state(c.redis, c.keys, hosts)
        alive = {h: worker_alive(w, seen, now) for h, (w, seen) in zip(hosts, states, strict=True)}
        return web.Response(body=_encode(alive), content_type=JSON)
    if workername is not None:
        hosts = [workername]
    pipe = c.redis.pipeline(transaction=False)
    for host in hosts:
        pipe.hgetall(c.keys.inspect(host))
    inspected = await pipe.execute()
    states = await event_state(c.redis, c.keys, hosts)
    out: dict[str, Any] = {}
    for host, h, (w, seen) in zip(hosts, inspected, states, strict=True):
        info = worker_inspect(h) if h else {}
        if info:
            if workername is None:
                for method in TASK_LISTS:
                    info.pop(method, None)
            out[host] = info
        elif w or seen is not None:
            out[host] = worker_from_hash(host, w, seen, now)
    if workername is not None and workername not in out:
        raise not_found(f"Unknown worker '{workername}'")
    return web.Response(body=_encode(out), content_type=JSON)


routes: list[Any] = [
    web.get("/api/workers", list_workers),
]
openapi_paths: Spec = {
    "/api/workers": operation(
        "get",
        "Workers: inspect data, or liveness with status=1 (Flower-compatible)",
        [
            param("refresh", "accepted; inspect data is refreshed by the enabler", BOOL),
            param("workername", "one worker (adds its active/reserved/scheduled/revoked)"),
            param("status", "only {hostname: alive}", BOOL),
        ],
        json_body("hostname -> inspect answers (or event fields)"),
        {**ERRORS, "404": json_body("unknown worker", ERROR)},
    ),
}
