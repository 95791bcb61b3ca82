"""Queue endpoints: ``/api/queues/length`` (Flower's) and ``/api/queues/history``, both from the
enabler's samples (``shared/inspected.py`` reads them)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import ctx
from services.api.openapi import INTEGER, Spec, json_body, operation, param
from shared.inspected import history_entry, queue_lengths

_encode = msgspec.json.encode
JSON = "application/json"


async def queue_length(request: web.Request) -> web.Response:
    c = ctx(request)
    samples = queue_lengths(await c.redis.hgetall(c.keys.queues))
    return web.Response(body=_encode({"active_queues": samples}), content_type=JSON)


async def queues_history(request: web.Request) -> web.Response:
    """The enabler's per-minute queue lengths, oldest first: ``minutes`` (default 60, at most
    ``POLLEN_QUEUE_HISTORY``). Answers ``{"history": [{"time", "queues": {name: n}}]}``."""
    c = ctx(request)
    minutes = params.integer(
        request.query, "minutes", 60, minimum=1, maximum=c.settings.queue_history
    )
    rows = await c.redis.xrevrange(c.keys.queues_history, count=minutes)
    history = [history_entry(entry_id, fields) for entry_id, fields in reversed(rows)]
    return web.Response(body=_encode({"history": history}), content_type=JSON)


routes = [
    web.get("/api/queues/length", queue_length),
    web.get("/api/queues/history", queues_history),
]
openapi_paths: Spec = {
    "/api/queues/length": operation(
        "get",
        "Queue lengths sampled by the enabler, with each queue's oldest waiting message",
        [],
        json_body(
            "active_queues: [{name, messages, consumers (RabbitMQ only), time (of the sample), "
            "oldest: {task_id, since, age} of the oldest waiting message, or null when the queue "
            "is empty or the broker cannot tell}]",
            {"type": "object", "properties": {"active_queues": {"type": "array"}}},
        ),
    ),
    "/api/queues/history": operation(
        "get",
        "Per-minute queue lengths sampled by the enabler, oldest first",
        [param("minutes", "entries (default 60, max POLLEN_QUEUE_HISTORY)", INTEGER)],
        json_body(
            "history: [{time (minute start), queues: {name: messages}}]",
            {"type": "object", "properties": {"history": {"type": "array"}}},
        ),
    ),
}
