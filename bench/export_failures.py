"""What failures by cause and the export cost: the bench stream through the collector's write
path into a private Redis, then a real API process.

- Redis bytes of the failure keys (``idx:exc:*``, ``failures``, ``failminute:*``,
  ``failfirst``/``faillast``) per failed or retried task, and of the ``_x`` field;
- ``/api/failures`` and ``/api/tasks?exception=<class>&limit=100`` latency (keep-alive client,
  p50/p99 over ``--requests``);
- ``/api/tasks/export`` of every task (NDJSON, CSV) and of a sparse search: tasks per second.

``python -m bench.export_failures --tasks 100000``
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis

from bench.micro import apply_all, decoded_stream
from bench.systems import scratch
from services.collector.writer import Writer
from shared.keys import HIDDEN
from shared.settings import load
from tests.support.api import Api, api_env
from tests.support.replies import raw, raw_list
from tests.support.servers import RedisServer


def _latency(conn: http.client.HTTPConnection, path: str, n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, (path, resp.status)
        times.append((time.perf_counter() - began) * 1000)
    q = statistics.quantiles(times, n=100)
    return {"p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2)}


def _export(port: int, query: str, tasks: int) -> dict[str, float]:
    """Read a whole export; ``tasks``: how many it walks (every task, or every one a search
    examines), for the rate."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    began = time.perf_counter()
    conn.request("GET", f"/api/tasks/export?{query}")
    resp = conn.getresponse()
    size = 0
    while chunk := resp.read(1 << 16):
        size += len(chunk)
    seconds = time.perf_counter() - began
    conn.close()
    return {"bytes": size, "seconds": round(seconds, 2), "tasks_per_s": round(tasks / seconds)}


def run(tasks: int, requests: int, workdir: Path) -> dict[str, Any]:
    server = RedisServer(workdir / "redis-failures").start()
    client = redis.Redis(port=server.port)
    api: Api | None = None
    try:
        settings = load({"POLLEN_REDIS_URL": server.url, "POLLEN_NAMESPACE": "fx"})
        writer = Writer(client, settings)
        apply_all(writer, decoded_stream(tasks, True, settings), settings)
        shard = writer.keys.all_shards[0]
        failure_keys = [
            *client.scan_iter(shard.by_exception("*"), 1000),
            *client.scan_iter(shard.failure_minute(0).replace(":0", ":*"), 1000),
            shard.failures.encode(),
            shard.failures_first.encode(),
            shard.failures_last.encode(),
        ]
        key_bytes = sum(int(client.memory_usage(k, samples=0) or 0) for k in failure_keys)
        failed: set[bytes] = set()
        for k in client.scan_iter(shard.by_exception("*"), 1000):
            failed.update(raw_list(client.zrange(k, 0, -1)))
        x_bytes = 0
        for u in failed:
            x_bytes += len(HIDDEN.exceptions) + len(
                raw(client.hget(shard.task(u.decode()), HIDDEN.exceptions) or b"")
            )
        api = Api(api_env(server, "fx"), workdir / "api.log")
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        classes = json.loads(api.get("/api/failures")[2])["classes"]
        top = classes[0]["exception"]
        stored = int(client.zcard(shard.by_timestamp))
        out: dict[str, Any] = {
            "tasks": stored,
            "failed_or_retried_tasks": len(failed),
            "classes": len(classes),
            "failure_keys_bytes_per_failed_task": round(key_bytes / max(1, len(failed)), 1),
            "x_field_bytes_per_failed_task": round(x_bytes / max(1, len(failed)), 1),
            "api_failures": _latency(conn, "/api/failures", requests),
            "api_tasks_exception_limit_100": _latency(
                conn, f"/api/tasks?exception={top}&limit=100", requests
            ),
            "export_ndjson_all": _export(api.port, "format=ndjson", stored),
            "export_csv_all": _export(api.port, "format=csv", stored),
            # nothing matches: every task is examined (past many capped scans), none sent
            "export_search_no_match": _export(api.port, "search=args:nothing-matches", stored),
        }
        conn.close()
        return out
    finally:
        if api is not None:
            api.stop()
        client.close()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=300)
    a = p.parse_args(argv)
    with scratch() as wd:
        json.dump(run(a.tasks, a.requests, wd), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
