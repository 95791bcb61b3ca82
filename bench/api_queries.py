"""API query latency and WebSocket fan-out, side by side with Flower.

Seeds N tasks into a private redis-server through the collector's write path (``Writer``),
starts a real ``python -m services.api`` and measures p50/p99 of sequential requests:
``/api/tasks?limit=100`` (default sort, state filter, name filter, deep offset, search) and
``/api/task/info/<uuid>``. At N <= 100k (or with --flower) the same events are fed to Flower's
``EventsState`` in this process and Flower's handler work (``iter_tasks`` + ``as_dict`` +
JSON, no HTTP) is timed for the same queries. Then C WebSocket clients connect and events are
published at R events/s: event-to-client latency p50/p99 (from the event's timestamp, set just
before it is written, to its arrival at a client).

    python -m bench.api_queries --tasks 100000 [--tasks 1000000] [--ws-clients 500]

Results: ``bench/out/api_queries.json`` (one object per task count), for the bench harness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import types
import uuid as uuidlib
from pathlib import Path
from typing import Any

import aiohttp
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.http import BareWsClient, new_ws_stats  # noqa: E402
from services.collector.writer import Writer  # noqa: E402
from shared.settings import load  # noqa: E402
from tests.support import readback  # noqa: E402
from tests.support.servers import PYTHON, Process, RedisServer, free_port, wait_for  # noqa: E402

NAMES = [f"bench.task{i}" for i in range(10)]
WORKERS = [f"celery@bench{i}" for i in range(4)]
OUT = ROOT / "bench" / "out" / "api_queries.json"


def task_events(count: int, seed: int = 1) -> tuple[list[dict[str, Any]], list[str]]:
    rng = random.Random(seed)
    t0 = time.time() - 3600
    events: list[dict[str, Any]] = []
    uuids = []
    for i in range(count):
        uuid = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        uuids.append(uuid)
        ts = t0 + i * 3000 / count
        worker = WORKERS[i % len(WORKERS)]
        name = NAMES[rng.randrange(len(NAMES))]
        events.append(
            {
                "type": "task-received",
                "uuid": uuid,
                "hostname": worker,
                "timestamp": ts,
                "clock": i,
                "name": name,
                "args": f"({i}, 'item-{i % 1000}')",
                "kwargs": f"{{'user': 'u{i % 50}'}}",
                "retries": 0,
                "root_id": uuid,
                "parent_id": None,
            }
        )
        roll = rng.random()
        if roll < 0.9:
            events.append(
                {
                    "type": "task-succeeded",
                    "uuid": uuid,
                    "hostname": worker,
                    "timestamp": ts + 0.4,
                    "clock": i,
                    "result": f"'r{i}'",
                    "runtime": 0.4,
                }
            )
        elif roll < 0.97:
            events.append(
                {
                    "type": "task-failed",
                    "uuid": uuid,
                    "hostname": worker,
                    "timestamp": ts + 0.4,
                    "clock": i,
                    "exception": "ValueError('x')",
                    "traceback": "Traceback ...",
                }
            )
        else:
            events.append(
                {
                    "type": "task-started",
                    "uuid": uuid,
                    "hostname": worker,
                    "timestamp": ts + 0.1,
                    "clock": i,
                }
            )
    return events, uuids


def seed(port: int, events: list[dict[str, Any]]) -> float:
    settings = load(
        {
            "POLLEN_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "POLLEN_NAMESPACE": "b",
            "POLLEN_MAX_TASKS": str(10**8),
        }
    )
    client = redis.Redis(port=port)
    writer = Writer(client, settings)
    started = time.perf_counter()
    for i in range(0, len(events), 2000):
        writer.apply(readback.decode_events(events[i : i + 2000]), time.time())
    client.close()
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(ms, 0.5), 2),
        "p99_ms": round(pct(ms, 0.99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "n": len(ms),
    }


def queries(count: int, uuids: list[str]) -> dict[str, str]:
    return {
        "default": "/api/tasks?limit=100",
        "state_filter": "/api/tasks?limit=100&state=FAILURE",
        "name_filter": "/api/tasks?limit=100&taskname=bench.task3",
        "deep_offset": f"/api/tasks?limit=100&offset={count // 2}",
        "search": "/api/tasks?limit=100&search=item-777",
        "search_state_term": "/api/tasks?limit=100&search=state:failure+item-7",
    }


async def measure_api(port: int, count: int, uuids: list[str], requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for label, path in queries(count, uuids).items():
            times = []
            headers: dict[str, str] = {}
            for _ in range(requests):
                t = time.perf_counter()
                async with session.get(base + path) as resp:
                    await resp.read()
                    assert resp.status == 200, (path, resp.status)
                    headers = dict(resp.headers)
                times.append((time.perf_counter() - t) * 1000)
            out[label] = summary(times) | {"examined": int(headers.get("X-Pollen-Examined", 0))}
        rng = random.Random(3)
        times = []
        for _ in range(requests):
            t = time.perf_counter()
            async with session.get(f"{base}/api/task/info/{rng.choice(uuids)}") as resp:
                await resp.read()
            times.append((time.perf_counter() - t) * 1000)
        out["task_info"] = summary(times)
    return out


async def profile_search(redis_port: int, search: str) -> dict[str, Any]:
    """Where a scanning search spends Redis time, per task examined: the query engine run in
    this process with the plain query_tasks.lua (script time and Redis CPU), then with a
    TIME-probed copy (``bench.lua_profile.instrumented``) whose per-command shares of the script
    time (probes' own cost taken out) split the plain script's CPU between commands and the Lua
    logic."""
    import redis.asyncio

    from bench.lua_profile import CALLS_KEY, PROFILE_KEY, instrumented
    from services.api.query import QueryEngine, TaskQuery
    from shared import scripts
    from shared.keys import Keys

    client = redis.asyncio.Redis(port=redis_port)
    sync = redis.Redis(port=redis_port)
    query = TaskQuery(search=search, limit=100)
    out: dict[str, Any] = {"search": search}
    script_usec: dict[str, int] = {}
    try:
        for variant in ("plain", "instrumented"):
            source = scripts.source("query_tasks")
            if variant == "instrumented":
                source = instrumented(source)
            engine = QueryEngine(client, Keys("b", 1), client.register_script(source), 100_000)
            await engine.run(query)  # loads the script
            sync.delete(PROFILE_KEY, CALLS_KEY)
            sync.config_resetstat()
            cpu = sync.info("cpu")
            page = await engine.run(query)
            cpu_after = sync.info("cpu")
            stats = sync.info("commandstats")
            script_usec[variant] = sum(
                int(v["usec"]) for k, v in stats.items() if k.startswith("cmdstat_evalsha")
            )
            if variant == "plain":
                spent = sum(cpu_after[k] - cpu[k] for k in ("used_cpu_user", "used_cpu_sys"))
                n = max(1, page.examined)
                out["examined"] = page.examined
                out["script_usec_per_task"] = round(script_usec["plain"] / n, 2)
                out["redis_cpu_usec_per_task"] = round(spent * 1e6 / n, 2)
        probe = _probe_usec(sync)
        times = {_text(k): int(v) for k, v in sync.hgetall(PROFILE_KEY).items()}
        calls = {_text(k): int(v) for k, v in sync.hgetall(CALLS_KEY).items()}
        # each wrapped call runs two TIME probes, one inside the interval it measures
        net = {name: max(0.0, times[name] - calls[name] * probe) for name in times}
        total = max(1.0, script_usec["instrumented"] - 2 * probe * sum(calls.values()))
        cpu_per_task = out["redis_cpu_usec_per_task"]
        out["commands_usec_per_task"] = {
            name: round(cpu_per_task * t / total, 2) for name, t in sorted(net.items())
        }
        out["lua_logic_usec_per_task"] = round(
            cpu_per_task * max(0.0, 1 - sum(net.values()) / total), 2
        )
    finally:
        await client.aclose()
        sync.delete(PROFILE_KEY, CALLS_KEY)
        sync.close()
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _probe_usec(client: redis.Redis, n: int = 100_000) -> float:
    client.config_resetstat()
    client.eval(f"for i = 1, {n} do redis.call('TIME') end return 1", 0)
    return int(client.info("commandstats")["cmdstat_eval"]["usec"]) / n


def measure_flower(
    events: list[dict[str, Any]], count: int, uuids: list[str], requests: int
) -> dict[str, Any]:
    from flower.events import EventsState
    from flower.utils.tasks import iter_tasks

    state = EventsState(max_tasks_in_memory=count + 10)
    started = time.perf_counter()
    for event in events:
        state.event(dict(event, local_received=event["timestamp"]))
    load_s = time.perf_counter() - started
    ns = types.SimpleNamespace(state=state)
    kwargs: dict[str, dict[str, Any]] = {
        "default": {"limit": 100},
        "state_filter": {"limit": 100, "state": "FAILURE"},
        "name_filter": {"limit": 100, "type": "bench.task3"},
        "deep_offset": {"limit": 100, "offset": count // 2},
        "search": {"limit": 100, "search": "item-777"},
        "search_state_term": {"limit": 100, "search": "state:failure item-7"},
    }
    out: dict[str, Any] = {"load_seconds": round(load_s, 1)}
    for label, kw in kwargs.items():
        times = []
        for _ in range(max(5, requests // 5)):
            t = time.perf_counter()
            result = []
            for uuid, task in iter_tasks(ns, **kw):
                d = task.as_dict()
                w = d.pop("worker", None)
                if w is not None:
                    d["worker"] = w.hostname
                result.append((uuid, d))
            json.dumps(dict(result))
            times.append((time.perf_counter() - t) * 1000)
        out[label] = summary(times)
    rng = random.Random(3)
    times = []
    for _ in range(requests):
        t = time.perf_counter()
        task = state.tasks.get(rng.choice(uuids))
        d = task.as_dict()
        d["worker"] = task.worker.hostname if task.worker else None
        json.dumps(d)
        times.append((time.perf_counter() - t) * 1000)
    out["task_info"] = summary(times)
    return out


def _ws_clients(port: int, clients: int, path: str, batched: bool, pipe: Any) -> None:
    """A process of ``clients`` WebSocket clients; says "ready", waits for "stop", reports."""

    async def main() -> dict[str, Any]:
        stats = new_ws_stats()
        loop = asyncio.get_running_loop()
        readers = []
        for _ in range(clients):
            _, reader = await loop.create_connection(
                lambda: BareWsClient(path, batched, stats), "127.0.0.1", port
            )
            readers.append(reader)
        await asyncio.gather(*(r.ready for r in readers))
        pipe.send("ready")
        await loop.run_in_executor(None, pipe.recv)
        for r in readers:
            if r.transport is not None:
                r.transport.close()
        lat = stats["latencies"]
        if len(lat) > 100_000:
            stats["latencies"] = random.Random(1).sample(lat, 100_000)
        return stats

    pipe.send(asyncio.run(main()))


def measure_ws(
    redis_port: int,
    api_port: int,
    clients: int,
    rate: int,
    seconds: float,
    batch_ms: int = 0,
    procs: int = 2,
) -> dict[str, Any]:
    settings = load(
        {"POLLEN_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "POLLEN_NAMESPACE": "b"}
    )
    path = "/api/events" + (f"?batch={batch_ms}" if batch_ms else "")
    ctx = multiprocessing.get_context("spawn")
    workers = []
    for i in range(procs):
        share = clients // procs + (1 if i < clients % procs else 0)
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=_ws_clients, args=(api_port, share, path, bool(batch_ms), theirs), daemon=True
        )
        proc.start()
        workers.append((proc, ours))
    for _, pipe in workers:
        assert pipe.poll(120), "WebSocket clients did not connect"
        assert pipe.recv() == "ready"

    client = redis.Redis(port=redis_port)
    writer = Writer(client, settings)
    sent = 0
    batch = max(1, rate // 20)
    start = time.time()
    i = 0
    while time.time() - start < seconds:
        now = time.time()
        events = [
            {
                "type": "worker-heartbeat",
                "hostname": f"celery@ws{(i + k) % 8}",
                "timestamp": now,
                "clock": i + k,
                "freq": 2.0,
                "active": 0,
            }
            for k in range(batch)
        ]
        writer.apply(readback.decode_events(events), now)
        sent += batch
        i += batch
        ahead = start + sent / rate - time.time()
        if ahead > 0:
            time.sleep(ahead)
    client.close()
    time.sleep(3)
    received, cut, latencies = 0, 0, []
    for proc, pipe in workers:
        pipe.send("stop")
        assert pipe.poll(60), "WebSocket clients did not report"
        stats = pipe.recv()
        received += stats["received"]
        cut += stats["cut"]
        latencies.extend(stats["latencies"])
        proc.join(10)
    return {
        "clients": clients,
        "events_per_second": rate,
        "batch_ms": batch_ms,
        "seconds": seconds,
        "events_sent": sent,
        "deliveries_expected": sent * clients,
        "deliveries": received,
        "clients_cut": cut,
        "latency_sampling": "per batch" if batch_ms else "last message of each socket read",
        **(summary(latencies) if latencies else {}),
    }


def run(count: int, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="pollen-bench-api-"))
    server = RedisServer(workdir / "redis").start()
    api: Process | None = None
    try:
        events, uuids = task_events(count)
        seed_s = seed(server.port, events)
        port = free_port()
        env = {
            "POLLEN_REDIS_URL": server.url,
            "POLLEN_NAMESPACE": "b",
            "POLLEN_API_PORT": str(port),
            "POLLEN_LOG_LEVEL": "WARNING",
            "POLLEN_WS_QUEUE": str(args.ws_queue),
        }
        api = Process([PYTHON, "-m", "services.api"], workdir / "api.log", env)
        wait_for(lambda: redis.Redis(port=server.port).ping(), timeout=5)
        import urllib.request

        wait_for(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200,
            timeout=20,
        )
        result: dict[str, Any] = {
            "tasks": count,
            "events": len(events),
            "seed_seconds": round(seed_s, 1),
        }
        if not args.no_queries:
            result["pollen"] = asyncio.run(measure_api(port, count, uuids, args.requests))
            result["search_profile"] = asyncio.run(profile_search(server.port, "item-777"))
        if not args.no_queries and (args.flower or (count <= 100_000 and not args.no_flower)):
            result["flower_in_process"] = measure_flower(events, count, uuids, args.requests)
        if args.ws_clients:
            result["websocket"] = measure_ws(
                server.port, port, args.ws_clients, args.ws_rate, args.ws_seconds
            )
            if args.ws_batch:
                result["websocket_batched"] = measure_ws(
                    server.port, port, args.ws_clients, args.ws_rate, args.ws_seconds, args.ws_batch
                )
        return result
    finally:
        if api is not None:
            api.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, action="append", help="task count (repeatable)")
    parser.add_argument("--requests", type=int, default=200, help="requests per query")
    parser.add_argument("--flower", action="store_true", help="also time Flower above 100k")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--ws-clients", type=int, default=500)
    parser.add_argument("--ws-rate", type=int, default=1000, help="events per second")
    parser.add_argument("--ws-seconds", type=float, default=10.0)
    parser.add_argument("--ws-queue", type=int, default=1000, help="POLLEN_WS_QUEUE")
    parser.add_argument(
        "--ws-batch", type=int, default=100, help="also measure batch=<ms> clients (0: not)"
    )
    parser.add_argument("--no-queries", action="store_true", help="WebSocket part only")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    results = []
    for count in args.tasks or [100_000]:
        print(f"--- {count} tasks", file=sys.stderr)
        result = run(count, args)
        print(json.dumps(result, indent=2))
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"benchmark": "api_queries", "cpus": os.cpu_count(), "results": results}, indent=2
        )
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
