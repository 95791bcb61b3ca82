"""A WebSocket response that fails a connection cleanly (RFC 6455 §7.1.1 and §7.1.7).

When aiohttp's reader refuses a frame (larger than ``max_msg_size``, malformed, bad UTF-8) it
sends the Close frame (1009, 1002, 1007) and closes the socket at once. The client is usually
still sending the refused frame then, so the kernel answers the unread bytes with a TCP reset
and the client never reads the Close frame: it sees 1006 or "connection reset" instead (the
flaky ``test_garbage_and_huge_frames_close_only_that_client``). The RFC asks an endpoint that
fails a connection to send the Close frame and then close the TCP connection cleanly,
"discarding any trailing bytes". This class does that: after the Close frame it half-closes
(FIN), reads and discards what the client still sends, and ends the connection when the client
closes its side or after ``linger`` seconds, whichever comes first. Memory stays bounded: the
discarded bytes are never buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import WSCloseCode, web

#: The close codes aiohttp's reader fails a connection with; Pollen's own closes use others.
READER_FAILURES = frozenset(
    {WSCloseCode.PROTOCOL_ERROR, WSCloseCode.INVALID_TEXT, WSCloseCode.MESSAGE_TOO_BIG}
)


class _Discard(asyncio.Protocol):
    """Stands in for aiohttp's protocol once the reader has failed: drops the client's trailing
    bytes, closes on the client's FIN, and hands the connection's end back to aiohttp."""

    def __init__(self, inner: asyncio.BaseProtocol, done: asyncio.Future[None]) -> None:
        self.inner = inner
        self.done = done

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)
        if not self.done.done():
            self.done.set_result(None)


class WebSocket(web.WebSocketResponse):
    """``web.WebSocketResponse`` whose failed connections end with a clean TCP close."""

    def __init__(self, *, linger: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._linger = linger
        self._failing = False
        self._peer_closed: asyncio.Future[None] | None = None

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        # aiohttp's receive() calls close() with the reader's code when a frame is refused
        if code in READER_FAILURES:
            self._failing = True
        return await super().close(code=code, message=message, drain=drain)

    def _close_transport(self) -> None:
        # the one place aiohttp closes the socket (every aiohttp 3.9+); half-close instead
        # when the reader failed, so the Close frame is not destroyed by a reset
        transport = self._req.transport if self._req is not None else None
        if (
            not self._failing
            or self._peer_closed is not None
            or transport is None
            or transport.is_closing()
            or not transport.can_write_eof()
        ):
            super()._close_transport()
            return
        self._peer_closed = asyncio.get_running_loop().create_future()
        transport.set_protocol(_Discard(transport.get_protocol(), self._peer_closed))
        transport.write_eof()  # after the Close frame already queued

    async def wait_closed(self) -> None:
        """After a failed connection: until the client closed its side (or ``linger`` passed,
        then the socket is closed anyway). Returns at once otherwise."""
        if self._peer_closed is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._peer_closed), self._linger)
        transport = self._req.transport if self._req is not None else None
        if transport is not None and not transport.is_closing():
            transport.close()
