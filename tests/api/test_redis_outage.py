"""Redis killed under a running API: answers 503 (never hangs), /healthz stays up, /readyz
says why; after Redis restarts the same process recovers, WebSocket relay included."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.api.test_events_ws import collect, seed_async
from tests.support.api import Api
from tests.support.dataset import task_events
from tests.support.servers import RedisServer, wait_for

EVENTS = task_events(20, seed=13)


async def test_redis_down_then_back(tmp_path: Path, start_api: Any) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        api: Api = start_api(server, "outage")
        await seed_async(server, "outage", EVENTS)
        assert api.get("/api/tasks?limit=5")[0] == 200

        server.kill()
        for path in (
            "/api/tasks?limit=5",
            "/api/tasks?search=tasks",
            f"/api/task/info/{EVENTS[0].get('uuid', 'x')}",
            "/api/task/types",
            "/api/workers",
            "/api/queues/length",
            "/metrics",
        ):
            status, _, body = api.request("GET", path, timeout=15)
            assert status == 503, (path, body)
            assert json.loads(body)["error"].startswith("state store unavailable")
        status, _, body = api.request("GET", "/readyz", timeout=15)
        assert status == 503 and json.loads(body)["reason"].startswith("redis")
        assert api.request("GET", "/healthz", timeout=15)[0] == 200
        async with aiohttp.ClientSession() as session:
            # the relay is not subscribed while Redis is away: refused, not left hanging
            try:
                ws = await session.ws_connect(f"{api.url}/api/events")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503
            else:
                await ws.close()
                raise AssertionError("WebSocket accepted while Redis is down")

        server.start()  # same port, empty (no persistence)
        wait_for(lambda: api.get("/api/tasks?limit=5")[0] == 200, timeout=60, message="recovery")
        async with aiohttp.ClientSession() as session:
            ws = await wait_for_ws(session, api)
            await seed_async(server, "outage", EVENTS)
            got = await collect(ws, len(EVENTS))
            assert [e["type"] for e in got] == [e["type"] for e in EVENTS]
            await ws.close()
        assert len(json.loads(api.get("/api/tasks?limit=1000")[2])) == len(
            {e["uuid"] for e in EVENTS if "uuid" in e}
        )
    finally:
        server.stop()


async def wait_for_ws(
    session: aiohttp.ClientSession, api: Api, timeout: float = 60.0
) -> aiohttp.ClientWebSocketResponse:
    """The relay accepting a client again (it answers 503 until it has resubscribed): polled
    until a deadline, as ``wait_for`` (which cannot await)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await session.ws_connect(f"{api.url}/api/events")
        except aiohttp.WSServerHandshakeError:
            if time.monotonic() >= deadline:
                raise AssertionError("the event relay did not resubscribe") from None
            await asyncio.sleep(0.2)
