"""One WebSocket client of the relay: its filter, its bounded buffers and, while it replays,
the live events that arrive meanwhile."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from services.api.events.filter import EventFilter
from services.api.events.frames import text_frame, with_cursor
from services.api.events.ids import Positions, StreamId
from shared.events import StreamEvent

TRY_AGAIN_LATER = 1013
#: Seconds a cut-off client has to read what was sent and the close frame before the
#: connection is dropped.
CLOSE_TIMEOUT = 15.0


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
        if len(self.pending) > self.limit:
            self.cut(f"too slow: over {self.limit} events queued; resume with since=")
            return
        self.pending.extend(it for it in items if self.filter.match(it.ev))

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
            if len(self.batched) > self.limit:
                self.cut(f"too slow: over {self.limit} events queued; resume with since=")
                return
            self.batched.extend(payloads if payloads is not None else [i.payload for i in items])
            if self.timer is None:
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
        return it.payload if self.shards == 1 else with_cursor(it.message, positions)

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
        # the events of earlier writes that the socket has not taken yet: a client that keeps
        # up has taken them by the next burst, however large one burst (a collector call) is
        taken = self.written - transport.get_write_buffer_size()
        while self.inflight and self.inflight[0][0] <= taken:
            self.behind -= self.inflight.popleft()[1]
        if self.behind > self.limit:
            self.cut(f"too slow: over {self.limit} events queued; resume with since=")
            return
        transport.write(data)
        self.written += len(data)
        self.inflight.append((self.written, events))
        self.behind += events

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
        return with_cursor(message, tuple(self.sent))

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
