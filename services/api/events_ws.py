"""``/api/events``: a WebSocket relay of the normalized events, with filters and resume.

One Redis pub/sub subscription per process (``EventHub``) is fanned out in-process to every
client. The hub takes the messages that arrived together (a collector batch) as one burst,
decodes each event once, encodes its WebSocket frame once, and for each distinct filter joins
the frames of the matching events once: a client costs one write of shared bytes per burst, not
one JSON encode or one write per event. aiohttp pings every ``POLLEN_WS_HEARTBEAT`` seconds and
drops a client that does not answer.

Bounded buffers: a client has at most ``POLLEN_WS_QUEUE`` events written but not yet taken by
its socket (or buffered while it replays, or waiting for its next batch); a client further
behind is closed with code 1013 and a reason, and never slows the others.

Messages are the normalized event JSON (the stream entry) plus ``stream_id``; with several
shards also ``cursor``: one stream id per shard, comma-joined in shard order, the position after
this event (every event of every shard up to it was relayed before it, or did not match the
client's filters). ``batch=<ms>`` (1..10000) sends, instead of one message per event, one JSON
array of the events of every ``ms`` milliseconds (a message only when there is one); replay and
the lost-events notice come as arrays too.

Resume: ``since=<cursor>`` replays the stream after that position (``XRANGE`` with an exclusive
start), then continues live with no gap and no duplicate: the client is registered with the hub
(live events are buffered) before the replay, and buffered events at or before the last
replayed id are dropped. A single id applies to every shard (stream ids are millisecond times,
so it reads as "since that time"). When events after the cursor were already trimmed from a
shard's stream, the client first receives
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
import struct
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from services.api.context import CONTEXT, Context, ctx
from services.api.errors import ApiError, bad_param
from services.api.websocket import WebSocket
from shared.backoff import Backoff
from shared.connections import REDIS_ERRORS
from shared.events import StreamEvent
from shared.keys import shard_of

log = logging.getLogger("pollen.api.events")

StreamId = tuple[int, int]
Positions = tuple[StreamId | None, ...]
#: A stream id: ASCII digits, each part below 2**64 (Redis refuses anything else).
_ID_RE = re.compile(r"^([0-9]{1,20})(?:-([0-9]{1,20}))?$")
_decode_event = msgspec.json.Decoder(StreamEvent).decode
_encode = msgspec.json.encode
#: Entries read per XRANGE call during a replay.
REPLAY_BATCH = 500
#: Most entries the hub reads back per shard to fill a gap after a lost subscription.
GAP_FILL_MAX = 10_000
TRY_AGAIN_LATER = 1013
#: Most pub/sub messages the hub takes as one burst.
MAX_BURST = 1000
#: Seconds a cut-off client has to read what was sent and the close frame before the
#: connection is dropped.
CLOSE_TIMEOUT = 15.0
#: Largest ``batch=`` in milliseconds.
MAX_BATCH_MS = 10_000


def parse_id(text: str) -> StreamId:
    m = _ID_RE.match(text)
    if m is None:
        raise ValueError(text)
    ms, seq = int(m.group(1)), int(m.group(2) or 0)
    if ms >= 2**64 or seq >= 2**64:
        raise ValueError(text)
    return ms, seq


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked WebSocket text frame (what a server sends) holding ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def _with_cursor(message: bytes, positions: Positions) -> bytes:
    cursor = ",".join(format_id(s) if s else "0-0" for s in positions)
    return message[:-1] + b',"cursor":"' + cursor.encode() + b'"}'


@dataclass(frozen=True, slots=True)
class EventFilter:
    types: tuple[str, ...] = ()
    uuids: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    workers: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()
    _types_re: re.Pattern[str] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.types:
            pattern = "|".join(f"(?:{fnmatch.translate(t)})" for t in self.types)
            object.__setattr__(self, "_types_re", re.compile(pattern))

    def match(self, ev: StreamEvent) -> bool:
        if self._types_re is not None and self._types_re.match(ev.type) is None:
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
        tuple(sorted(set(types))),
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


def parse_batch(request: web.Request) -> float:
    """``batch=<ms>`` in seconds (0: one message per event)."""
    raw = request.query.get("batch")
    if raw is None or not raw.strip():
        return 0.0
    try:
        ms = int(raw)
    except ValueError:
        raise bad_param("batch", f"expected milliseconds, got {raw!r}") from None
    if not 1 <= ms <= MAX_BATCH_MS:
        raise bad_param("batch", f"expected 1..{MAX_BATCH_MS} milliseconds, got {ms}")
    return ms / 1000


def _shard_of(ev: StreamEvent, shards: int) -> int:
    identity = ev.uuid if ev.type.startswith("task-") and ev.uuid else ev.hostname
    return shard_of(identity, shards)


@dataclass(slots=True)
class Item:
    """One relayed event: decoded once, its message and frame encoded once for every client."""

    ev: StreamEvent
    shard: int
    sid: StreamId
    message: bytes  # the event JSON with stream_id
    positions: Positions  # the hub's position on every shard after this event
    payload: bytes  # message, plus the cursor of ``positions`` with several shards
    frame: bytes


class Client:
    """One WebSocket client: its filter, bounded buffers and, while it replays, the live events
    that arrive meanwhile."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        flt: EventFilter,
        limit: int,
        shards: int,
        batch: float = 0.0,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.filter = flt
        self.limit = limit
        self.shards = shards
        self.batch = batch
        self.pending: list[Item] = []
        self.sent: list[StreamId | None] = [None] * shards
        self.replayed: list[StreamId | None] = [None] * shards
        # after a replay, its end positions until the hub's have passed them: events up to
        # them are not sent again, and cursors never go back
        self.floor: list[StreamId | None] | None = None
        self.batched: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        # frames written but not yet taken by the socket: (end offset, events)
        self.inflight: deque[tuple[int, int]] = deque()
        self.written = 0
        self.behind = 0
        self.sender: asyncio.Task[None] | None = None
        self.closing = False
        self._close_task: asyncio.Task[None] | None = None

    # --- live -------------------------------------------------------------------------------

    def offer(self, items: Sequence[Item]) -> None:
        """Live events for this client while it replays: kept until the replay is done."""
        if self.closing:
            return
        self.pending.extend(it for it in items if self.filter.match(it.ev))
        if len(self.pending) > self.limit:
            self.cut(f"too slow: over {self.limit} events queued; resume with since=")

    def deliver(self, items: Sequence[Item], frames: bytes | None) -> None:
        """Matching live events; ``frames``: their frames joined (shared by a filter group)."""
        if self.closing or not items:
            return
        payloads: list[bytes] | None = None
        if self.floor is not None:
            # just replayed: the hub may still relay events the replay has sent
            floor = self.floor
            items = [it for it in items if (f := floor[it.shard]) is None or it.sid > f]
            payloads = [self._payload(it) for it in items]
            frames = None
            if not items:
                return
        if self.batch:
            self.batched.extend(payloads if payloads is not None else [i.payload for i in items])
            if len(self.batched) > self.limit:
                self.cut(f"too slow: over {self.limit} events queued; resume with since=")
            elif self.timer is None:
                self.timer = asyncio.get_running_loop().call_later(self.batch, self._flush)
            return
        if frames is None:
            frames = b"".join(text_frame(p) for p in (payloads or [it.payload for it in items]))
        self._write(frames, len(items))

    def _payload(self, it: Item) -> bytes:
        floor = self.floor
        if floor is None:
            return it.payload
        positions = tuple(
            f if f is not None and (p is None or f > p) else p
            for p, f in zip(it.positions, floor, strict=True)
        )
        if positions == it.positions:
            self.floor = None
            return it.payload
        return it.payload if self.shards == 1 else _with_cursor(it.message, positions)

    def _flush(self) -> None:
        self.timer = None
        if self.closing or not self.batched:
            return
        batch, self.batched = self.batched, []
        self._write(text_frame(b"[" + b",".join(batch) + b"]"), len(batch))

    def _write(self, data: bytes, events: int) -> None:
        transport = self.transport
        if transport.is_closing():
            self.closing = True
            return
        transport.write(data)
        self.written += len(data)
        self.inflight.append((self.written, events))
        self.behind += events
        taken = self.written - transport.get_write_buffer_size()
        while self.inflight and self.inflight[0][0] <= taken:
            self.behind -= self.inflight.popleft()[1]
        if self.behind > self.limit:
            self.cut(f"too slow: over {self.limit} events queued; resume with since=")

    # --- replay -----------------------------------------------------------------------------

    async def send(self, messages: list[bytes]) -> None:
        """Replayed messages (and notices), with the socket's backpressure."""
        if not messages:
            return
        if self.batch:
            await self.ws.send_str((b"[" + b",".join(messages) + b"]").decode())
            return
        for m in messages:
            await self.ws.send_str(m.decode())

    def replayed_message(self, shard: int, sid: StreamId, message: bytes) -> bytes:
        self.sent[shard] = sid
        if self.shards == 1:
            return message
        return _with_cursor(message, tuple(self.sent))

    def go_live(self) -> list[Item]:
        """The buffered live events not covered by the replay; the client is live after."""
        items = [
            it for it in self.pending if (done := self.replayed[it.shard]) is None or it.sid > done
        ]
        self.pending = []
        self.floor = list(self.replayed)
        return items

    # --- closing ----------------------------------------------------------------------------

    def cut(self, reason: str) -> None:
        """Close this client without waiting for it (the hub never awaits a client)."""
        if self.closing:
            return
        self.closing = True
        self.batched = []
        self.pending = []
        if self.timer is not None:
            self.timer.cancel()
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
        self.transport.abort()

    async def run(self, hub: EventHub, c: Context, since: list[StreamId]) -> None:
        """Replay, then hand over to the hub for live events."""
        try:
            await replay(c, self, since)
            hub.go_live(self)
        except asyncio.CancelledError:
            raise
        except REDIS_ERRORS:
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
    client.sent = list(since)
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
            notice = {
                "type": "pollen-events-lost",
                "shard": shard.index,
                "since": format_id(start),
                "first_id": first_id,
            }
            await client.send([_encode(notice)])
        client.replayed[shard.index] = start
    # k-way merge of the shards' streams by id
    batches: list[deque[tuple[StreamId, bytes, dict[bytes, bytes]]]] = [deque() for _ in shards]
    exhausted = [False] * len(shards)

    async def refill(i: int) -> None:
        position = client.replayed[i]
        assert position is not None
        entries = await c.redis.xrange(
            shards[i].stream, min="(" + format_id(position), count=REPLAY_BATCH
        )
        batches[i] = deque((parse_id(sid.decode()), sid, fields) for sid, fields in entries)
        exhausted[i] = not entries

    out: list[bytes] = []
    while True:
        for i in range(len(shards)):
            if not batches[i] and not exhausted[i]:
                await client.send(out)
                out = []
                await refill(i)
        live = [i for i in range(len(shards)) if batches[i]]
        if not live:
            await client.send(out)
            return
        i = min(live, key=lambda k: batches[k][0][0])
        sid, raw_id, fields = batches[i].popleft()
        client.replayed[i] = sid
        message = _entry_message(raw_id, fields)
        if message is None:
            continue
        try:
            ev = _decode_event(fields[b"e"])
        except msgspec.DecodeError:
            continue
        if client.filter.match(ev):
            out.append(client.replayed_message(i, sid, message))


class EventHub:
    """The process's single subscription to the events channel, fanned out to clients."""

    def __init__(self, c: Context) -> None:
        self.c = c
        self.shards = c.keys.shards
        # live clients by filter: the matching and the frames are computed once per filter
        self.groups: dict[EventFilter, set[Client]] = {}
        self.replaying: set[Client] = set()
        self.last: list[StreamId | None] = [None] * self.shards
        self.task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    @property
    def clients(self) -> set[Client]:
        out = set(self.replaying)
        for group in self.groups.values():
            out |= group
        return out

    def add(self, client: Client, replaying: bool = False) -> None:
        if replaying:
            self.replaying.add(client)
        else:
            self.groups.setdefault(client.filter, set()).add(client)

    def go_live(self, client: Client) -> None:
        """Move a client from its replay to live events (synchronously: nothing is missed)."""
        self.replaying.discard(client)
        if client.closing:
            return
        items = client.go_live()
        self.groups.setdefault(client.filter, set()).add(client)
        client.deliver(items, None if client.floor is not None else _frames(items))

    def discard(self, client: Client) -> None:
        self.replaying.discard(client)
        group = self.groups.get(client.filter)
        if group is not None:
            group.discard(client)
            if not group:
                del self.groups[client.filter]
        if client.timer is not None:
            client.timer.cancel()

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="pollen-event-hub")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for client in list(self.clients):
            client.cut("server shutting down")

    def _item(self, raw: bytes) -> Item | None:
        try:
            ev = _decode_event(raw)
            sid = parse_id(ev.stream_id or "")
        except (msgspec.DecodeError, ValueError):
            return None
        shard = _shard_of(ev, self.shards)
        last = self.last[shard]
        if last is not None and sid <= last:
            return None  # already relayed (gap fill overlap)
        self.last[shard] = sid
        positions = tuple(self.last)
        payload = raw if self.shards == 1 else _with_cursor(raw, positions)
        return Item(ev, shard, sid, raw, positions, payload, text_frame(payload))

    def dispatch(self, raws: Iterable[bytes]) -> None:
        """Relay a burst of pub/sub messages to every client whose filter they match."""
        items = [it for it in map(self._item, raws) if it is not None]
        if not items:
            return
        for client in list(self.replaying):
            client.offer(items)
        for flt, group in list(self.groups.items()):
            matched = [it for it in items if flt.match(it.ev)]
            if not matched:
                continue
            frames = _frames(matched)
            for client in list(group):
                client.deliver(matched, frames)

    async def _positions(self) -> None:
        """Start each shard's position at the end of its stream (before the subscription: the
        gap fill relays what arrives in between)."""
        for shard in self.c.keys.all_shards:
            if self.last[shard.index] is None:
                top = await self.c.redis.xrevrange(shard.stream, count=1)
                self.last[shard.index] = parse_id(top[0][0].decode()) if top else (0, 0)

    async def _gap_fill(self) -> None:
        """After a lost subscription: relay what the stream holds past the last relayed ids."""
        for shard in self.c.keys.all_shards:
            last = self.last[shard.index]
            if last is None:
                continue
            entries = await self.c.redis.xrange(
                shard.stream, min="(" + format_id(last), count=GAP_FILL_MAX
            )
            messages = [_entry_message(sid, fields) for sid, fields in entries]
            self.dispatch(m for m in messages if m is not None)
            if len(entries) >= GAP_FILL_MAX:
                for client in list(self.clients):
                    client.cut(
                        "events were lost while the state store was away; resume with since="
                    )

    async def _run(self) -> None:
        backoff = Backoff("event subscription", log, first=0.1, cap=5.0)
        channel = self.c.keys.events_channel
        while True:
            pubsub = self.c.redis.pubsub()
            try:
                await self._positions()
                await pubsub.subscribe(channel)
                await self._gap_fill()
                self.connected.set()
                backoff.recovered()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    burst: list[bytes] = []
                    # a collector batch arrives at once: take what is already here as one burst
                    while message is not None and len(burst) < MAX_BURST:
                        if message.get("type") == "message":
                            burst.append(message["data"])
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=0.0
                        )
                    if message is not None and message.get("type") == "message":
                        burst.append(message["data"])
                    self.dispatch(burst)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:  # resubscribe with capped backoff
                self.connected.clear()
                if not isinstance(exc, REDIS_ERRORS):  # a bug or an odd reply: say where
                    log.exception("event subscription failed")
                backoff.failed(exc)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(backoff.delay())


#: The process's hub, made and stopped with the app (``hub_ctx``).
HUB = web.AppKey("pollen.events.hub", EventHub)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: one hub per API process, subscribed while the app runs."""
    hub = EventHub(app[CONTEXT])
    app[HUB] = hub
    await hub.start()
    yield
    await hub.stop()


def _frames(items: Sequence[Item]) -> bytes:
    return b"".join(it.frame for it in items)


#: Clients only send control frames; anything larger than this is closed at once.
MAX_CLIENT_FRAME = 4096


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
        client.sender = asyncio.create_task(client.run(hub, c, since))
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
