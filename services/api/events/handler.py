"""The relay's routes: ``/api/events`` and Flower 1.0's ``/api/task/events/...``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiohttp import WSCloseCode, WSMsgType, web

from services.api.context import Context, ctx
from services.api.errors import ApiError
from services.api.events.client import CLOSE_TIMEOUT, Client
from services.api.events.filter import parse_batch, parse_filter, parse_since
from services.api.events.hub import HUB, EventHub
from services.api.events.ids import StreamId
from services.api.events.replay import replay
from services.api.openapi import ERRORS, Spec, operation, param
from services.api.websocket import WebSocket
from shared.connections import REDIS_ERRORS

#: Clients only send control frames; anything larger than this is closed at once.
MAX_CLIENT_FRAME = 4096


async def catch_up(hub: EventHub, c: Context, client: Client, since: list[StreamId]) -> None:
    """Replay, then hand over to the hub for live events."""
    try:
        await replay(c, client, since)
        hub.go_live(client)
    except asyncio.CancelledError:
        raise
    except REDIS_ERRORS:
        client.cut("state store unavailable during replay")
    except ConnectionError:
        pass


async def events_ws(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    flt = parse_filter(request)
    since = parse_since(request, c.keys.shards)
    batch = parse_batch(request)
    ws = WebSocket(
        heartbeat=c.settings.ws_heartbeat,
        timeout=CLOSE_TIMEOUT,
        compress=False,
        max_msg_size=MAX_CLIENT_FRAME,  # larger frames are closed with 1009
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "expected a WebSocket upgrade request")
    hub = request.app.get(HUB)
    if hub is None:
        raise ApiError(503, "event relay not running")
    # once the handshake is done every later event reaches the client: wait for the subscription
    try:
        await asyncio.wait_for(hub.connected.wait(), c.settings.api_redis_timeout * 2)
    except TimeoutError:
        raise ApiError(503, "event relay not subscribed: state store unavailable") from None
    await ws.prepare(request)
    transport = request.transport
    if transport is None:
        return ws
    client = Client(ws, transport, flt, c.settings.ws_queue, c.keys.shards, batch)
    hub.add(client, replaying=since is not None)
    if since is not None:
        client.sender = asyncio.create_task(catch_up(hub, c, client, since))
    try:
        async for message in ws:
            # reading handles pings and the close; clients have nothing else to say, so data
            # from one is a broken or hostile client: close it, the others go on
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                client.closing = True
                await ws.close(
                    code=WSCloseCode.UNSUPPORTED_DATA,
                    message=b"this socket only sends events; clients send nothing",
                )
                break
    finally:
        hub.discard(client)
        if client.sender is not None:
            client.sender.cancel()
        if not ws.closed and not client.closing:
            await ws.close(code=WSCloseCode.GOING_AWAY)
        await ws.wait_closed()
    return ws


def event_routes() -> Iterable[web.RouteDef]:
    return [
        # auth.WEBSOCKET_ROUTES: the only routes where a ``token`` query parameter counts
        web.get("/api/events", events_ws, name="events"),
        web.get("/api/task/events/{event_type}/", events_ws, name="flower-events"),
        web.get("/api/task/events/{event_type}/{uuid}", events_ws, name="flower-task-events"),
    ]


routes = list(event_routes())

_WS = (
    "WebSocket. Each message is a normalized event (JSON) with stream_id (and cursor with "
    "several shards); see docs/api.md."
)
_PARAMS = [
    param("type", "event type, repeatable, wildcards like task-*"),
    param("uuid", "task uuid, repeatable"),
    param("taskname", "task name, repeatable"),
    param("worker", "event hostname, repeatable"),
    param("state", "task state after the event, repeatable"),
    param("since", "resume after this cursor (stream id, or one per shard comma-joined)"),
    param(
        "batch",
        "milliseconds: one JSON array of the events of each period",
        {"type": "integer", "minimum": 1, "maximum": 10000},
    ),
    param("token", "bearer token (for clients that cannot set headers)"),
]

_SWITCHING = {"101": {"description": "switching to WebSocket"}, **ERRORS}
_TYPE = param("event_type", "e.g. task-succeeded", where="path")
openapi_paths: Spec = {
    "/api/events": operation(
        "get",
        "Live events (WebSocket) with filters and resume",
        _PARAMS,
        None,
        _SWITCHING,
        description=_WS,
    ),
    "/api/task/events/{event_type}/": operation(
        "get",
        "Flower 1.0 task event WebSocket (one event type)",
        [_TYPE],
        None,
        _SWITCHING,
        description=_WS,
    ),
    "/api/task/events/{event_type}/{uuid}": operation(
        "get",
        "Flower 1.0 task event WebSocket (one event type, one task)",
        [_TYPE, param("uuid", "task id", where="path")],
        None,
        _SWITCHING,
        description=_WS,
    ),
}
