"""HTTP and WebSocket load for the query, push and scale-out scenarios.

HTTP load uses aiohttp clients; WebSocket listeners are bare asyncio protocols
(``BareWsClient``): aiohttp clients parsing every message were what limited the first push
measurements, not the API."""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "mean": statistics.fmean(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


async def _time_paths(
    base: str, paths: dict[str, list[str]], repeats: int, timeout: float
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    limit = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(
        connector=limit, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        for label, urls in paths.items():
            times: list[float] = []
            statuses: dict[str, int] = {}
            sizes: list[int] = []
            # one warm-up request, not timed
            async with session.get(base + urls[0]) as resp:
                await resp.read()
            for i in range(repeats):
                url = base + urls[i % len(urls)]
                t = time.perf_counter()
                async with session.get(url) as resp:
                    body = await resp.read()
                times.append(time.perf_counter() - t)
                statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
                sizes.append(len(body))
            out[label] = {
                **summary(times),
                "status": statuses,
                "bytes": statistics.fmean(sizes),
                "example": urls[0],
            }
    return out


def time_paths(
    base: str, paths: dict[str, list[str]], repeats: int, timeout: float = 120.0
) -> dict[str, dict[str, Any]]:
    """Latency of sequential GETs (one connection, kept alive) per labelled path group."""
    return asyncio.run(_time_paths(base, paths, repeats, timeout))


async def _load(
    bases: list[str], paths: list[str], seconds: float, concurrency: int
) -> dict[str, Any]:
    done = errors = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal done, errors
        i = n
        while time.monotonic() < stop_at:
            base = bases[i % len(bases)]
            path = paths[(i // len(bases)) % len(paths)]
            i += concurrency
            t = time.perf_counter()
            try:
                async with session.get(base + path) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        continue
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)
            done += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(client(session, n) for n in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {
        "requests": done,
        "errors": errors,
        "seconds": elapsed,
        "rps": done / elapsed,
        "latency": summary(latencies),
    }


def load(bases: list[str], paths: list[str], seconds: float, concurrency: int) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` clients spread over ``bases`` for ``seconds``."""
    return asyncio.run(_load(bases, paths, seconds, concurrency))


class _Times(msgspec.Struct):
    timestamp: float = 0.0
    local_received: float = 0.0


_decode_one = msgspec.json.Decoder(_Times).decode
_decode_many = msgspec.json.Decoder(list[_Times]).decode


class BareWsClient(asyncio.Protocol):
    """A bare WebSocket client: counts messages (events, with ``batch=``) and times the last
    event of each read against its timestamp. Cheap enough that 500 of them in two processes
    are not what limits the measurement (aiohttp clients with a JSON parse per message were)."""

    def __init__(self, path: str, batched: bool, stats: dict[str, Any]) -> None:
        self.path = path
        self.batched = batched
        self.stats = stats
        self.buf = bytearray()
        self.upgraded = False
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end == -1:
                return
            assert buf.startswith(b"HTTP/1.1 101"), bytes(buf[:200])
            del buf[: end + 4]
            self.upgraded = True
            self.ready.set_result(None)
        pos, last, frames = 0, None, 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if len(buf) - pos < head + n:
                break
            opcode = b0 & 0x0F
            if opcode == 1:
                frames += 1
                if self.batched:
                    self._timed(_decode_many(bytes(buf[pos + head : pos + head + n])))
                else:
                    last = (pos + head, n)
            elif opcode == 9 and self.transport is not None:  # ping: a masked pong
                payload = bytes(buf[pos + head : pos + head + n])
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            elif opcode == 8:
                code = struct.unpack_from("!H", buf, pos + head)[0] if n >= 2 else 1005
                if code != 1000:
                    self.stats["cut"] += 1
            pos += head + n
        if last is not None:
            self.stats["received"] += frames
            self._timed([_decode_one(bytes(buf[last[0] : last[0] + last[1]]))], count=False)
        del buf[:pos]

    def _timed(self, events: list[_Times], count: bool = True) -> None:
        now = time.time()
        if count:
            self.stats["received"] += len(events)
        sent, collected = self.stats["latencies"], self.stats["collected"]
        for e in events[-1:] if not count else events:
            sent.append((now - e.timestamp) * 1000)
            if e.local_received:
                collected.append((now - e.local_received) * 1000)


def new_ws_stats() -> dict[str, Any]:
    """What ``BareWsClient``s of one process add up: messages received, clients cut, and
    delays in ms (event timestamp -> arrival, collector receive time -> arrival)."""
    return {"received": 0, "cut": 0, "latencies": [], "collected": []}


def _ws_child(url: str, n: int, sample_every: int, ready: Any, go: Any, out: Any) -> None:
    """One client process: ``n`` bare clients until ``go`` is set (see ``ws_fanout``)."""
    parts = urlsplit(url)

    async def main() -> dict[str, Any]:
        stats = new_ws_stats()
        loop = asyncio.get_running_loop()
        clients = []
        for _ in range(n):
            _, client = await loop.create_connection(
                lambda: BareWsClient(parts.path or "/", False, stats),
                parts.hostname or "127.0.0.1",
                parts.port or 80,
            )
            clients.append(client)
        await asyncio.gather(*(c.ready for c in clients))
        ready.put(n)
        await loop.run_in_executor(None, go.wait)  # set by the parent once the stream is sent
        await asyncio.sleep(3)  # what is still in flight
        for c in clients:
            if c.transport is not None:
                c.transport.close()
        return stats

    stats = asyncio.run(main())
    out.put(
        {
            "messages": stats["received"],
            "closed_early": stats["cut"],
            "delays_sent": [d / 1000 for d in stats["latencies"][::sample_every]],
            "delays_collected": [d / 1000 for d in stats["collected"][::sample_every]],
        }
    )


def ws_fanout(
    url: str, clients: int, processes: int, sample_every: int, during: Any
) -> dict[str, Any]:
    """``clients`` WebSocket listeners spread over ``processes`` client processes; ``during()``
    runs in this process once every client is connected."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [
        clients // processes + (1 if i < clients % processes else 0) for i in range(processes)
    ]
    children = [
        ctx.Process(target=_ws_child, args=(url, n, sample_every, ready, go, out))
        for n in shares
        if n
    ]
    for c in children:
        c.start()
    try:
        for _ in children:
            ready.get(timeout=180)
        during()
        go.set()
        parts = [out.get(timeout=180) for _ in children]
    finally:
        for c in children:
            c.join(30)
            if c.is_alive():
                c.kill()
    sent = [d for p in parts for d in p["delays_sent"]]
    collected = [d for p in parts for d in p["delays_collected"]]
    return {
        "messages": sum(p["messages"] for p in parts),
        "closed_early": sum(p["closed_early"] for p in parts),
        "sender_to_client": summary(sent),
        "collector_to_client": summary(collected),
    }
