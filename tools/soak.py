"""``make soak``: a million tasks through the real stack with retention below that.

A RabbitMQ node and a Redis of its own, a collector, an enabler and an API process; task
lifecycles published through celery's EventDispatcher in chunks (the publisher waits while the
collector is more than ``--backlog`` events behind, so RabbitMQ never holds the whole stream);
an API client and a WebSocket client reading meanwhile. Every few seconds it samples Redis's
``used_memory`` and each process's VmRSS. It passes when

- every event is applied exactly once and at most ``--max-tasks`` tasks are kept,
- Redis's peak ``used_memory`` stays within the bound computed from the retention settings,
- no process grows without limit: after retention is reached (the warm state) no process's
  RSS grows more than 25% + 20 MB over its warm value,
- no service logs an error or a traceback.

Usage: ``python -m tools.soak [--tasks N] [--max-tasks M] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from shared.keys import Keys
from tests.support.clients import WsReader
from tests.support.servers import (
    PYTHON,
    ROOT,
    Process,
    RabbitNode,
    RedisServer,
    free_port,
    log_problems,
    pollen_env,
    rss_kb,
    service,
)
from tests.support.workloads import applied_events

NAMESPACE = "soak"
#: Redis bytes per kept task with its indexes, history and counters: README measures
#: ~1.9 KB for a typical task; this allows 35% more.
TASK_BYTES = 2600
#: Bytes per entry of the capped event stream (normalized JSON of ~300 bytes plus overhead).
STREAM_ENTRY_BYTES = 600
#: Fixed allowance: Redis's own structures, counters, per-minute hashes, scripts.
FIXED_BYTES = 48 * 2**20


def publish_chunk(broker_url: str, count: int, hostname: str) -> subprocess.Popen[bytes]:
    code = (
        "import sys; from tests.support.streams import publish_tasks; "
        f"publish_tasks({broker_url!r}, {count}, hostname={hostname!r})"
    )
    return subprocess.Popen([PYTHON, "-c", code], cwd=ROOT)


def http_get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
        return int(resp.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--max-tasks", type=int, default=200_000)
    parser.add_argument("--stream-maxlen", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--backlog", type=int, default=300_000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pollen-soak-"))
    print(f"soak: {args.tasks} tasks, POLLEN_MAX_TASKS={args.max_tasks}, logs in {work}")
    node = RabbitNode(work / "rabbit").start()
    state = RedisServer(work / "redis").start()
    r = redis.Redis(port=state.port)
    keys = Keys(NAMESPACE)
    settings = {
        "event_queue": "pollen-soak",
        "max_tasks": str(args.max_tasks),
        "stream_maxlen": str(args.stream_maxlen),
        "log_level": "INFO",
    }
    env = pollen_env(node.url, state.url, NAMESPACE, **settings)
    api_port = free_port()
    procs: dict[str, Process] = {}
    samples: list[dict[str, Any]] = []
    result: dict[str, Any] = {"tasks": args.tasks, "max_tasks": args.max_tasks}
    reader: WsReader | None = None
    ok = False
    try:
        base_memory = int(r.info("memory")["used_memory"])
        procs["collector"] = service("collector", env, work / "collector.log")
        procs["enabler"] = service("enabler", env, work / "enabler.log")
        procs["api"] = service("api", {**env, "POLLEN_API_PORT": str(api_port)}, work / "api.log")
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_get(f"{api}/healthz") == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        reader = WsReader(
            f"ws://127.0.0.1:{api_port}/api/events?type=task-succeeded&taskname=bench.task0",
            timeout=24 * 3600,
        )
        reader.start()
        reader.connected.wait(30)

        expected = 0
        published = 0
        started = time.monotonic()
        last_sample = 0.0
        publisher: subprocess.Popen[bytes] | None = None
        warm_at: float | None = None
        while True:
            applied = applied_events(r, keys)
            if publisher is not None and publisher.poll() is not None:
                if publisher.returncode != 0:
                    raise RuntimeError(f"publisher failed with {publisher.returncode}")
                publisher = None
            if publisher is None and published < args.tasks and expected - applied < args.backlog:
                count = min(args.chunk, args.tasks - published)
                publisher = publish_chunk(node.url, count, f"gen{published // args.chunk}@soak")
                published += count
                expected += 3 * count
            now = time.monotonic()
            if now - last_sample >= args.interval:
                last_sample = now
                kept = int(r.zcard(keys.all_shards[0].by_timestamp))
                if warm_at is None and kept >= args.max_tasks:
                    warm_at = now
                sample: dict[str, Any] = {
                    "t": round(now - started, 1),
                    "applied": applied,
                    "kept": kept,
                    "used_memory": int(r.info("memory")["used_memory"]),
                    "rss_kb": {name: rss_kb(p.pid) for name, p in procs.items()},
                    "warm": warm_at is not None,
                    "ws_messages": len(reader.messages),
                }
                for path in ("/api/tasks?limit=100", "/api/workers", "/metrics", "/readyz"):
                    status = http_get(api + path)
                    if status != 200:
                        raise RuntimeError(f"{path} answered {status}")
                samples.append(sample)
                print(
                    f"{sample['t']:7.1f}s applied {applied:>9} kept {kept:>7} "
                    f"redis {sample['used_memory'] / 2**20:7.1f} MB rss "
                    + " ".join(f"{k}={v / 1024:.0f}MB" for k, v in sample["rss_kb"].items()),
                    flush=True,
                )
                for name, p in procs.items():
                    if not p.alive():
                        raise RuntimeError(f"{name} exited:\n{p.output()[-3000:]}")
            if published >= args.tasks and publisher is None and applied >= expected:
                break
            time.sleep(0.2)
        time.sleep(2.0)
        elapsed = time.monotonic() - started
        final_applied = applied_events(r, keys)
        kept = int(r.zcard(keys.all_shards[0].by_timestamp))
        bound = (
            base_memory
            + args.max_tasks * TASK_BYTES
            + args.stream_maxlen * STREAM_ENTRY_BYTES
            + FIXED_BYTES
        )
        peak = max(s["used_memory"] for s in samples)
        warm = [s for s in samples if s["warm"]]
        growth: dict[str, dict[str, int]] = {}
        for name in procs:
            first = warm[0]["rss_kb"][name] if warm else samples[0]["rss_kb"][name]
            top = max(s["rss_kb"][name] for s in (warm or samples))
            growth[name] = {"warm_kb": first, "max_kb": top, "final_kb": rss_kb(procs[name].pid)}
        result.update(
            {
                "events_expected": expected,
                "events_applied": final_applied,
                "tasks_kept": kept,
                "seconds": round(elapsed, 1),
                "events_per_second": round(final_applied / elapsed),
                "redis_base_bytes": base_memory,
                "redis_peak_bytes": peak,
                "redis_final_bytes": int(r.info("memory")["used_memory"]),
                "redis_bound_bytes": bound,
                "rss": growth,
                "ws_messages": len(reader.messages),
                "samples": len(samples),
            }
        )
        failures = []
        if final_applied != expected:
            failures.append(f"applied {final_applied} events, expected {expected}")
        if kept > args.max_tasks:
            failures.append(f"{kept} tasks kept, more than {args.max_tasks}")
        if peak > bound:
            failures.append(f"Redis peak {peak} bytes over the bound {bound}")
        if not warm:
            failures.append("retention was never reached")
        for name, g in growth.items():
            if g["max_kb"] > g["warm_kb"] * 1.25 + 20 * 1024:
                failures.append(f"{name} RSS grew from {g['warm_kb']} kB to {g['max_kb']} kB")
        if reader.closed is not None:
            failures.append(f"the WebSocket client was closed: {reader.closed}")
        for name, p in procs.items():
            problems = log_problems(p.output())
            if problems:
                failures.append(f"{name} logged: {problems[:5]}")
        result["failures"] = failures
        ok = not failures
    finally:
        if reader is not None:
            reader.stop_flag.set()
        for p in procs.values():
            p.stop()
        state.stop()
        node.stop()
        result["ok"] = ok
        result["logs"] = str(work)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
