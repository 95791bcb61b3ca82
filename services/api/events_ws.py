"""``/api/events``: a WebSocket relay of the normalized events, with filters and resume.

One Redis pub/sub subscription per process (``EventHub``) is fanned out in-process to every
client. Each client has a bounded send queue: a client that falls ``POLLEN_WS_QUEUE`` messages
behind is closed with code 1013 and a reason, and never slows the others. aiohttp pings every
``POLLEN_WS_HEARTBEAT`` seconds and drops a client that does not answer.

Messages are the normalized event JSON (the stream entry) plus ``stream_id``; with several
shards also ``cursor``. Resume: ``since=<cursor>`` replays the stream after that position
(``XRANGE`` with an exclusive start), then continues live with no gap and no duplicate: the
client is registered with the hub (live events are buffered) before the replay, and buffered
events at or before the last replayed id are dropped. A cursor is one stream id per shard,
comma-joined in shard order (``"1700000000000-0,1700000000001-3"``); a single id applies to
every shard (stream ids are millisecond times, so it reads as "since that time"). When events
after the cursor were already trimmed from a shard's stream, the client first receives
``{"type": "pollen-events-lost", "shard": i, "since": ..., "first_id": ...}``.

Filters (query parameters, each repeatable, all must match): ``type`` (``task-*`` style
wildcards), ``uuid``, ``taskname``, ``worker`` (the event's hostname), ``state`` (the task's
state after the event). Flower 1.0's ``/api/task/events/<type>/[<uuid>]`` paths are the same
relay with ``type`` (and ``uuid``) set.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import WSCloseCode, web

from services.api.context import Context, ctx
from services.api.errors import REDIS_DOWN, ApiError, bad_param
from shared.events import StreamEvent
from shared.keys import shard_of

log = logging.getLogger("pollen.api.events")

StreamId = tuple[int, int]
_ID_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
_decode_event = msgspec.json.Decoder(StreamEvent).decode
_encode = msgspec.json.encode
#: Entries read per XRANGE call during a replay.
REPLAY_BATCH = 500
#: Most entries the hub reads back per shard to fill a gap after a lost subscription.
GAP_FILL_MAX = 10_000
TRY_AGAIN_LATER = 1013
#: The hub lets the clients' senders run after this many events of a burst.
YIELD_EVERY = 8
#: Seconds a cut-off client has to read what was sent and the close frame before the
#: connection is dropped.
CLOSE_TIMEOUT = 15.0


def parse_id(text: str) -> StreamId:
    m = _ID_RE.match(text)
    if m is None:
        raise ValueError(text)
    return int(m.group(1)), int(m.group(2) or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


@dataclass(frozen=True, slots=True)
class EventFilter:
    types: tuple[str, ...] = ()
    uuids: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    workers: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()

    def match(self, ev: StreamEvent) -> bool:
        if self.types and not any(fnmatch.fnmatchcase(ev.type, t) for t in self.types):
            return False
        if self.uuids and ev.uuid not in self.uuids:
            return False
        if self.names and ev.task_name not in self.names:
            return False
        if self.workers and ev.hostname not in self.workers:
            return False
        return not self.states or ev.task_state in self.states


def _values(request: web.Request, name: str) -> list[str]:
    return [
        v.strip() for raw in request.query.getall(name, []) for v in raw.split(",") if v.strip()
    ]


def parse_filter(request: web.Request) -> EventFilter:
    types = _values(request, "type")
    event_type = request.match_info.get("event_type")
    if event_type:
        types = [event_type if event_type.startswith("task-") else f"task-{event_type}"]
    uuids = _values(request, "uuid")
    if request.match_info.get("uuid"):
        uuids = [request.match_info["uuid"]]
    for t in types:
        if len(t) > 100:
            raise bad_param("type", "event type pattern too long")
    return EventFilter(
        tuple(types),
        frozenset(uuids),
        frozenset(_values(request, "taskname")),
        frozenset(_values(request, "worker")),
        frozenset(_values(request, "state")),
    )


def parse_since(request: web.Request, shards: int) -> list[StreamId] | None:
    raw = request.query.get("since")
    if raw is None or not raw.strip():
        return None
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) not in (1, shards):
        raise bad_param("since", f"expected 1 or {shards} comma-separated stream ids")
    try:
        ids = [parse_id(p) for p in parts]
    except ValueError:
        raise bad_param("since", f"expected stream ids like 1700000000000-0, got {raw!r}") from None
    return ids * shards if len(ids) == 1 else ids


def _shard_of(ev: StreamEvent, shards: int) -> int:
    identity = ev.uuid if ev.type.startswith("task-") and ev.uuid else ev.hostname
    return shard_of(identity, shards)


class Client:
    """One WebSocket client: its filter, bounded queue and per-shard position."""

    def __init__(self, ws: web.WebSocketResponse, flt: EventFilter, maxsize: int, shards: int):
        self.ws = ws
        self.filter = flt
        self.queue: asyncio.Queue[tuple[int, StreamId, bytes]] = asyncio.Queue(maxsize)
        self.shards = shards
        self.sent: list[StreamId | None] = [None] * shards
        self.replayed: list[StreamId | None] = [None] * shards
        self.sender: asyncio.Task[None] | None = None
        self.closing = False
        self._close_task: asyncio.Task[None] | None = None

    def offer(self, ev: StreamEvent, shard: int, sid: StreamId, raw: bytes) -> None:
        if self.closing or not self.filter.match(ev):
            return
        try:
            self.queue.put_nowait((shard, sid, raw))
        except asyncio.QueueFull:
            self.cut(f"too slow: over {self.queue.maxsize} events queued; resume with since=")

    def cut(self, reason: str) -> None:
        """Close this client without waiting for it (the hub never awaits a client)."""
        if self.closing:
            return
        self.closing = True
        if self.sender is not None:
            self.sender.cancel()
        self._close_task = asyncio.create_task(self._close(TRY_AGAIN_LATER, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(
                self.ws.close(code=code, message=reason.encode()[:120]), CLOSE_TIMEOUT
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            # the client does not read: drop the connection
            self.abort()

    def abort(self) -> None:
        # aiohttp exposes no public handle on the transport of a prepared WebSocket
        req = self.ws._req
        if req is not None and req.transport is not None:
            req.transport.abort()

    def _message(self, shard: int, sid: StreamId, raw: bytes) -> bytes:
        self.sent[shard] = sid
        if self.shards == 1:
            return raw
        cursor = ",".join(format_id(s) if s else "0-0" for s in self.sent)
        return raw[:-1] + b',"cursor":"' + cursor.encode() + b'"}'

    async def send(self, shard: int, sid: StreamId, raw: bytes) -> None:
        await self.ws.send_str(self._message(shard, sid, raw).decode())

    async def run(self, c: Context, since: list[StreamId] | None) -> None:
        """Replay (when asked), then relay the queued live events."""
        try:
            if since is not None:
                await replay(c, self, since)
            while True:
                shard, sid, raw = await self.queue.get()
                done = self.replayed[shard]
                if done is not None and sid <= done:
                    continue
                await self.send(shard, sid, raw)
        except asyncio.CancelledError:
            raise
        except REDIS_DOWN:
            self.cut("state store unavailable during replay")
        except ConnectionError:
            pass


async def _stream_info(c: Context, key: str) -> dict[str, Any]:
    try:
        flat = await c.redis.execute_command("XINFO", "STREAM", key)
    except Exception as exc:  # no such key: nothing retained
        if "no such key" in str(exc).lower():
            return {}
        raise
    if isinstance(flat, dict):
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in flat.items()}
    return {
        (flat[i].decode() if isinstance(flat[i], bytes) else flat[i]): flat[i + 1]
        for i in range(0, len(flat), 2)
    }


def _entry_message(sid: bytes, fields: dict[bytes, bytes]) -> bytes | None:
    body = fields.get(b"e")
    if not body or not body.endswith(b"}"):
        return None
    return body[:-1] + b',"stream_id":"' + sid + b'"}'


async def replay(c: Context, client: Client, since: list[StreamId]) -> None:
    """Send the retained events after ``since`` (per shard), merged in id order."""
    shards = c.keys.all_shards
    for shard in shards:
        info = await _stream_info(c, shard.stream)
        deleted = info.get("max-deleted-entry-id")
        first = info.get("first-entry")
        first_id = first[0].decode() if first else None
        start = since[shard.index]
        # trimming removes the oldest entries: with some removed (entries-added > length), a
        # cursor older than the first entry may have missed some
        added, length = info.get("entries-added"), info.get("length")
        trimmed = added is not None and length is not None and int(added) > int(length)
        lost = first_id is not None and trimmed and start < parse_id(first_id)
        if deleted is not None:
            text = deleted.decode() if isinstance(deleted, bytes) else str(deleted)
            lost = lost or start < parse_id(text)
        if lost:
            await client.ws.send_str(
                _encode(
                    {
                        "type": "pollen-events-lost",
                        "shard": shard.index,
                        "since": format_id(start),
                        "first_id": first_id,
                    }
                ).decode()
            )
        client.replayed[shard.index] = start
    # k-way merge of the shards' streams by id
    batches: list[list[tuple[StreamId, bytes, dict[bytes, bytes]]]] = [[] for _ in shards]
    exhausted = [False] * len(shards)

    async def refill(i: int) -> None:
        position = client.replayed[i]
        assert position is not None
        entries = await c.redis.xrange(
            shards[i].stream, min="(" + format_id(position), count=REPLAY_BATCH
        )
        batches[i] = [(parse_id(sid.decode()), sid, fields) for sid, fields in entries]
        exhausted[i] = not entries

    while True:
        for i in range(len(shards)):
            if not batches[i] and not exhausted[i]:
                await refill(i)
        live = [i for i in range(len(shards)) if batches[i]]
        if not live:
            return
        i = min(live, key=lambda k: batches[k][0][0])
        sid, raw_id, fields = batches[i].pop(0)
        client.replayed[i] = sid
        message = _entry_message(raw_id, fields)
        if message is None:
            continue
        try:
            ev = _decode_event(fields[b"e"])
        except msgspec.DecodeError:
            continue
        if client.filter.match(ev):
            await client.send(i, sid, message)


class EventHub:
    """The process's single subscription to the events channel, fanned out to clients."""

    def __init__(self, c: Context) -> None:
        self.c = c
        self.clients: set[Client] = set()
        self.last: list[StreamId | None] = [None] * c.keys.shards
        self.task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def add(self, client: Client) -> None:
        self.clients.add(client)

    def discard(self, client: Client) -> None:
        self.clients.discard(client)

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="pollen-event-hub")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for client in list(self.clients):
            client.cut("server shutting down")

    def dispatch(self, raw: bytes) -> None:
        try:
            ev = _decode_event(raw)
            sid = parse_id(ev.stream_id or "")
        except (msgspec.DecodeError, ValueError):
            return
        shard = _shard_of(ev, self.c.keys.shards)
        last = self.last[shard]
        if last is not None and sid <= last:
            return  # already relayed (gap fill overlap)
        self.last[shard] = sid
        for client in list(self.clients):
            client.offer(ev, shard, sid, raw)

    async def _gap_fill(self) -> None:
        """After a lost subscription: relay what the stream holds past the last relayed ids."""
        for shard in self.c.keys.all_shards:
            last = self.last[shard.index]
            if last is None:
                continue
            entries = await self.c.redis.xrange(
                shard.stream, min="(" + format_id(last), count=GAP_FILL_MAX
            )
            for sid, fields in entries:
                message = _entry_message(sid, fields)
                if message is not None:
                    self.dispatch(message)
            if len(entries) >= GAP_FILL_MAX:
                for client in list(self.clients):
                    client.cut(
                        "events were lost while the state store was away; resume with since="
                    )

    async def _run(self) -> None:
        delay = 0.1
        channel = self.c.keys.events_channel
        while True:
            pubsub = self.c.redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                await self._gap_fill()
                self.connected.set()
                delay = 0.1
                burst = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.dispatch(message["data"])
                        burst += 1
                        if burst % YIELD_EVERY == 0:
                            # a collector batch arrives at once: let the senders drain
                            await asyncio.sleep(0)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:  # Redis away: resubscribe with capped backoff
                self.connected.clear()
                log.warning("event subscription lost (%r); retrying in %.1fs", exc, delay)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


async def events_ws(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    flt = parse_filter(request)
    since = parse_since(request, c.keys.shards)
    ws = web.WebSocketResponse(heartbeat=c.settings.ws_heartbeat, timeout=CLOSE_TIMEOUT)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "expected a WebSocket upgrade request")
    if c.hub is None:
        raise ApiError(503, "event relay not running")
    # once the handshake is done every later event reaches the client: wait for the subscription
    try:
        await asyncio.wait_for(c.hub.connected.wait(), c.settings.api_redis_timeout * 2)
    except TimeoutError:
        raise ApiError(503, "event relay not subscribed: state store unavailable") from None
    await ws.prepare(request)
    client = Client(ws, flt, c.settings.ws_queue, c.keys.shards)
    c.hub.add(client)
    client.sender = asyncio.create_task(client.run(c, since))
    try:
        async for _ in ws:
            pass  # clients have nothing to say; reading handles pings and the close
    finally:
        c.hub.discard(client)
        if client.sender is not None:
            client.sender.cancel()
        if not ws.closed and not client.closing:
            await ws.close(code=WSCloseCode.GOING_AWAY)
    return ws


def event_routes() -> Iterable[web.RouteDef]:
    return [
        web.get("/api/events", events_ws),
        web.get("/api/task/events/{event_type}/", events_ws),
        web.get("/api/task/events/{event_type}/{uuid}", events_ws),
    ]


routes = list(event_routes())
