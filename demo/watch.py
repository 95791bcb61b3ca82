"""Print live events from Pollen's WebSocket: ``python -m demo.watch ws://host:5555/api/events``."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp


async def watch(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                print(message.data, flush=True)
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                print(f"closed: {ws.close_code} {message.extra or ''}", file=sys.stderr)
                return


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:5555/api/events"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(url))


if __name__ == "__main__":
    main()
