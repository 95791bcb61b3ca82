"""Clients of the API as users run them: a WebSocket reader in a thread of its own."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import aiohttp


class WsReader(threading.Thread):
    """A WebSocket client of ``/api/events`` in a thread of its own, keeping every message."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.timeout = timeout
        self.messages: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.closed: str | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        asyncio.run(self._read())

    async def _read(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self.connected.set()
            deadline = time.monotonic() + self.timeout
            while not self.stop_flag.is_set() and time.monotonic() < deadline:
                try:
                    msg = await ws.receive(timeout=0.5)
                except TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    self.closed = f"{msg.type} {msg.data!r} {msg.extra!r}"
                    return
                self.messages.append(json.loads(msg.data))
