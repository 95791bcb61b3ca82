"""WebSocket abuse against a real API process: many connections, a client that never reads,
garbage and huge frames. Each bad client is closed; the others keep receiving everything;
the API's memory stays bounded."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from services.collector.writer import Writer
from shared.settings import load
from tests.support import readback
from tests.support.api import Api, api_env
from tests.support.servers import RedisServer

NAMESPACE = "wsabuse"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Api, Writer]]:
    server = RedisServer(tmp_path / "redis").start()
    api = Api(api_env(server, NAMESPACE, ws_queue="200"), tmp_path / "api.log")
    client = redis.Redis(port=server.port)
    writer = Writer(client, load({"POLLEN_REDIS_URL": server.url, "POLLEN_NAMESPACE": NAMESPACE}))
    try:
        yield api, writer
    finally:
        api.stop()
        client.close()
        server.stop()
    log = api.process.output()
    assert "Traceback (most recent call last):" not in log, log[-3000:]


def publish(writer: Writer, count: int, start: int = 0, payload: int = 0) -> None:
    """``count`` task-failed events through the collector's write path (state + pub/sub)."""
    now = time.time()
    events = [
        {
            "type": "task-failed",
            "uuid": f"ws-{start + i}",
            "hostname": "w@h",
            "timestamp": now + i * 1e-4,
            "clock": start + i,
            "exception": "E()",
            "traceback": "x" * payload,
        }
        for i in range(count)
    ]
    for i in range(0, count, 500):
        readback.apply(writer, events[i : i + 500], now)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def collect(ws: aiohttp.ClientWebSocketResponse, want: int, timeout: float) -> set[str]:
    """uuids of the events received until ``want`` of them arrived."""
    seen: set[str] = set()
    async with asyncio.timeout(timeout):
        while len(seen) < want:
            message = await ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"closed early: {message.type} {ws.close_code}")
            data = message.json()
            if isinstance(data, dict) and "uuid" in data:
                seen.add(data["uuid"])
    return seen


async def test_many_connections_all_receive(stack: tuple[Api, Writer]) -> None:
    api, writer = stack
    # no connector limit: aiohttp allows 100 connections per session by default
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [await session.ws_connect(f"{api.url}/api/events") for _ in range(200)]
        await asyncio.to_thread(publish, writer, 50)
        results = await asyncio.gather(*(collect(ws, 50, 60) for ws in clients))
        assert all(r == {f"ws-{i}" for i in range(50)} for r in results)
        for ws in clients:
            await ws.close()


async def test_garbage_and_huge_frames_close_only_that_client(stack: tuple[Api, Writer]) -> None:
    api, writer = stack
    async with aiohttp.ClientSession() as session:
        good = await session.ws_connect(f"{api.url}/api/events")
        garbage = await session.ws_connect(f"{api.url}/api/events")
        huge = await session.ws_connect(f"{api.url}/api/events")
        binary = await session.ws_connect(f"{api.url}/api/events")
        await garbage.send_str("\x00not a thing the relay understands\xff")
        await huge.send_str("y" * (2 * 1024 * 1024))
        await binary.send_bytes(os.urandom(1024))
        for ws in (garbage, huge, binary):
            async with asyncio.timeout(15):
                while (await ws.receive()).type not in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                ):
                    pass
            assert ws.closed
        assert garbage.close_code == 1003 and binary.close_code == 1003
        assert huge.close_code == 1009
        await asyncio.to_thread(publish, writer, 20)
        assert await collect(good, 20, 30) == {f"ws-{i}" for i in range(20)}
        await good.close()


def _masked_frame_header(opcode: int, length: int) -> bytes:
    """A client frame's header (FIN set, 64-bit length, a zero mask so the payload is plain)."""
    return struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length) + b"\0\0\0\0"


def test_huge_frame_gets_close_1009_then_a_clean_close(stack: tuple[Api, Writer]) -> None:
    """RFC 6455 §7.1.1: the server that refuses a frame sends Close 1009, then closes TCP
    cleanly (FIN, trailing bytes discarded), so the client reads the Close frame even while it
    is still sending. A server that closed at once would answer the unread bytes with a reset
    (the flaky 1006 of issue #11); repeated because that reset is a race."""
    api, _ = stack
    payload = b"y" * (2 * 1024 * 1024)
    for _ in range(10):
        sock = _raw_websocket(api.port, rcvbuf=None)
        sock.settimeout(20)
        # the whole frame goes out: a server that reset the connection fails sendall here
        sock.sendall(_masked_frame_header(0x1, len(payload)) + payload)
        received = b""
        while chunk := sock.recv(65536):  # a reset raises ConnectionResetError here
            received += chunk
        # FIN after exactly one Close frame: code 1009 and its reason
        assert received[:1] == b"\x88", received[:40]
        length = received[1]
        assert length < 126 and len(received) == 2 + length, received
        assert struct.unpack("!H", received[2:4])[0] == 1009, received
        sock.close()


def _raw_websocket(port: int, rcvbuf: int | None = 4096) -> socket.socket:
    """A WebSocket client socket after the handshake. By default it has a tiny receive buffer,
    so the server's writes back up at once when it never reads."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Drain what the server sent; True when it closed the connection (EOF)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, ConnectionResetError):
        return False
    return True


async def test_never_reading_clients_are_cut_others_keep_up(stack: tuple[Api, Writer]) -> None:
    api, writer = stack
    stuck = [_raw_websocket(api.port) for _ in range(5)]
    try:
        async with aiohttp.ClientSession() as session:
            good = await session.ws_connect(f"{api.url}/api/events", max_msg_size=0)
            reader: asyncio.Task[Any] = asyncio.create_task(collect(good, 3000, 120))
            before = rss_kib(api.process.pid)
            # 3,000 events of ~8 KB: far more than a stuck client's buffers and queue hold
            await asyncio.to_thread(publish, writer, 3000, 0, 8000)
            received = await reader
            assert received == {f"ws-{i}" for i in range(3000)}
            after = rss_kib(api.process.pid)
            # five stuck clients must not make the API hold the stream for them
            assert after - before < 60 * 1024, (before, after)
            closed = [await asyncio.to_thread(_closed_by_server, s, 20) for s in stuck]
            assert all(closed)
            await good.close()
    finally:
        for s in stuck:
            s.close()
