"""The process's single subscription to the events channel, fanned out to every client.

It takes the messages that arrived together (collector calls; with many clients, all those of
its rest after the previous relay) as one burst, decodes each event once, encodes its frame
once, and for each distinct filter joins the frames of the matching events once. After a lost
subscription it fills the gap from the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence

import msgspec
from aiohttp import web

from services.api.context import CONTEXT, Context
from services.api.events.client import Client, Item
from services.api.events.filter import EventFilter
from services.api.events.frames import entry_message, text_frame, with_cursor
from services.api.events.ids import StreamId, format_id, parse_id
from shared.backoff import Backoff
from shared.connections import REDIS_ERRORS
from shared.events import StreamEvent, published_events
from shared.keys import shard_of

log = logging.getLogger("pollen.api.events")

_decode_event = msgspec.json.Decoder(StreamEvent).decode
#: Most entries the hub reads back per shard to fill a gap after a lost subscription.
GAP_FILL_MAX = 10_000
#: Most pub/sub messages the hub takes as one burst.
MAX_BURST = 1000
#: After a relay, the hub rests this many times as long as the relay took (at most
#: ``POLLEN_WS_MAX_DELAY``): fanning out then takes at most a third of its loop's time.
RELAY_REST = 2.0


def _shard_of(ev: StreamEvent, shards: int) -> int:
    identity = ev.uuid if ev.type.startswith("task-") and ev.uuid else ev.hostname
    return shard_of(identity, shards)


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
        payload = raw if self.shards == 1 else with_cursor(raw, positions)
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
            messages = [entry_message(sid, fields) for sid, fields in entries]
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
                loop = asyncio.get_running_loop()
                max_delay = self.c.settings.ws_max_delay
                rested = loop.time()  # when the next relay may start
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    wait = rested - loop.time()
                    if message is not None and wait > 0:
                        await asyncio.sleep(wait)
                    burst: list[bytes] = []
                    # a message holds a collector call's events; take what is already here
                    # (several collectors, several shards) as one burst
                    while message is not None and len(burst) < MAX_BURST:
                        if message.get("type") == "message":
                            burst.extend(published_events(message["data"]))
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=0.0
                        )
                    if message is not None and message.get("type") == "message":
                        burst.extend(published_events(message["data"]))
                    if burst:
                        started = loop.time()
                        self.dispatch(burst)
                        done = loop.time()
                        # rest in proportion to the fan-out's cost: with many clients, the
                        # events of several collector calls go out in each client's one write;
                        # not when more messages are waiting (resting would only add a lag)
                        rest = min(max_delay, RELAY_REST * (done - started))
                        rested = done if len(burst) >= MAX_BURST else done + rest
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
