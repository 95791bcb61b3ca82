"""Probes: ``/healthz`` (the process answers), ``/readyz`` (Redis answers and a collector
heartbeat is fresh; 503 with the reason otherwise) and Flower's ``/healthcheck``."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from services.api.context import ctx
from services.api.openapi import Spec, json_body, operation
from shared.connections import REDIS_ERRORS

_encode = msgspec.json.encode


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def healthcheck(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def readyz(request: web.Request) -> web.Response:
    c = ctx(request)
    try:
        newest = await c.redis.zrevrange(c.keys.collectors, 0, 0, withscores=True)
    except REDIS_ERRORS as exc:
        return _json(503, {"status": "unavailable", "reason": f"redis: {type(exc).__name__}"})
    if not newest:
        return _json(503, {"status": "unavailable", "reason": "no collector has reported"})
    collector, heartbeat = newest[0]
    age = time.time() - float(heartbeat)
    stale = c.settings.collector_stale_after
    if age > stale:
        reason = (
            f"newest collector heartbeat is {age:.1f} s old "
            f"(POLLEN_COLLECTOR_STALE_AFTER={stale:g})"
        )
        return _json(503, {"status": "unavailable", "reason": reason})
    return _json(
        200,
        {"status": "ready", "collector": collector.decode(), "heartbeat_age": round(age, 3)},
    )


routes: list[Any] = [
    # names: auth.HEALTH_ROUTES (open unless POLLEN_OPEN_HEALTH=0)
    web.get("/healthz", healthz, name="healthz"),
    web.get("/readyz", readyz, name="readyz"),
    web.get("/healthcheck", healthcheck, name="healthcheck"),
]
openapi_paths: Spec = {
    "/healthz": operation("get", "Liveness", [], json_body("the process answers"), {}),
    "/readyz": operation(
        "get",
        "Readiness: Redis answers and a collector heartbeat is fresh",
        [],
        json_body("ready"),
        {"503": json_body("not ready, with the reason")},
    ),
    "/healthcheck": operation("get", "Flower's health check", [], {"description": "OK"}, {}),
}
