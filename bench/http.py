"""HTTP and WebSocket load for the query, push and scale-out scenarios (aiohttp clients)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp


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


class WsListeners:
    """``n`` WebSocket clients of ``/api/events``; records each message's arrival delay."""

    def __init__(self, url: str, n: int) -> None:
        self.url = url
        self.n = n
        self.delays_sent: list[float] = []  # arrival - sender timestamp
        self.delays_collected: list[float] = []  # arrival - collector receive time
        self.messages = 0
        self.connected = 0
        self.closed_early = 0
        self._sample_every = 1

    async def _client(
        self, session: aiohttp.ClientSession, index: int, ready: asyncio.Event, stop: asyncio.Event
    ) -> None:
        try:
            async with session.ws_connect(self.url, heartbeat=None, max_msg_size=0) as ws:
                self.connected += 1
                if self.connected == self.n:
                    ready.set()
                while not stop.is_set():
                    try:
                        msg = await asyncio.wait_for(ws.receive(), timeout=0.5)
                    except TimeoutError:
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                            self.closed_early += 1
                            return
                        continue
                    now = time.time()
                    self.messages += 1
                    # every client is timed, but only a sample is kept to bound memory
                    if self.messages % self._sample_every == 0:
                        event = json.loads(msg.data)
                        if "timestamp" in event:
                            self.delays_sent.append(now - float(event["timestamp"]))
                        if "local_received" in event:
                            self.delays_collected.append(now - float(event["local_received"]))
        except aiohttp.ClientError:
            self.closed_early += 1

    async def run(self, during: Any, sample_every: int = 1) -> None:
        """Connect every client, run ``during()`` (a blocking callable, in a thread), then
        listen 3 s more and disconnect."""
        self._sample_every = sample_every
        ready, stop = asyncio.Event(), asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [
                asyncio.create_task(self._client(session, i, ready, stop)) for i in range(self.n)
            ]
            await asyncio.wait_for(ready.wait(), timeout=120)
            await asyncio.to_thread(during)
            await asyncio.sleep(3)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


def _ws_child(url: str, n: int, sample_every: int, ready: Any, go: Any, out: Any) -> None:
    """One client process: ``n`` listeners until ``go`` is cleared again (see ``ws_fanout``)."""
    listeners = WsListeners(url, n)

    def wait_for_end() -> None:
        ready.put(n)
        go.wait()  # set by the parent when the stream has been sent

    asyncio.run(listeners.run(wait_for_end, sample_every))
    out.put(
        {
            "messages": listeners.messages,
            "closed_early": listeners.closed_early,
            "delays_sent": listeners.delays_sent,
            "delays_collected": listeners.delays_collected,
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
