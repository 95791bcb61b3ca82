"""What Pollen's recommended Redis config (``shared.connections.RECOMMENDED_CONFIG``) changes:
the same batches of the bench stream into two private Redis servers, one with it and one with
Redis's default ``hash-max-ziplist-value 64``, alternating which goes first; then
``task_json.lua`` (what a listing reads) on the same random pages of 100 tasks on both.

``python -m bench.redis_config --tasks 20000``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import redis

from bench.lua_profile import script_usec
from bench.micro import decoded_stream
from bench.systems import scratch
from services.collector.writer import Writer
from shared import scripts
from shared.readers import LOST_FIELDS, TASK_JSON_SOURCES
from shared.settings import load
from tests.support.replies import raw_list
from tests.support.servers import RedisServer

PAGES = 300


def _paired(runs: list[list[tuple[str, Callable[[], int]]]]) -> dict[str, Any]:
    """``runs``: per item, (name, call) pairs; each call's Redis script time, alternating."""
    total: dict[str, int] = {}
    ratios = []
    for i, pair in enumerate(runs):
        took = {}
        for name, call in pair if i % 2 == 0 else reversed(pair):
            took[name] = call()
            total[name] = total.get(name, 0) + took[name]
        ratios.append(took["recommended"] / max(1, took["default"]))
    q = statistics.quantiles(ratios, n=4)
    return {"usec": total, "median_ratio": q[1], "p25": q[0], "p75": q[2]}


def run(tasks: int, workdir: Path) -> dict[str, Any]:
    servers = {
        "recommended": RedisServer(workdir / "recommended").start(),
        "default": RedisServer(workdir / "default", None, "--hash-max-ziplist-value", "64").start(),
    }
    clients = {name: redis.Redis(port=s.port) for name, s in servers.items()}
    try:
        settings = load({"POLLEN_NAMESPACE": "cfg"})
        writers = {name: Writer(c, settings) for name, c in clients.items()}
        decoded = decoded_stream(tasks, True, settings)

        def apply(name: str, chunk: list[Any]) -> Callable[[], int]:
            def call() -> int:
                before = script_usec(clients[name])
                writers[name].apply(chunk, 1.79e9)
                return script_usec(clients[name]) - before

            return call

        size = settings.batch_size
        chunks = [decoded[i : i + size] for i in range(0, len(decoded), size)]
        writes = _paired([[(n, apply(n, chunk)) for n in clients] for chunk in chunks])
        memory = {n: int(c.info("memory")["used_memory"]) / tasks for n, c in clients.items()}
        shard = writers["recommended"].keys.all_shards[0]
        source = scripts.source("task_json")
        shas = {n: c.script_load(source) for n, c in clients.items()}
        fields = msgspec.msgpack.encode([*(s for _, s, _ in TASK_JSON_SOURCES), *LOST_FIELDS])
        uuids = [
            u.decode() for u in raw_list(clients["recommended"].zrange(shard.by_timestamp, 0, -1))
        ]
        rng = random.Random(3)

        def read(name: str, page: list[str]) -> Callable[[], int]:
            def call() -> int:
                c = clients[name]
                before = script_usec(c)
                c.evalsha(shas[name], 1, shard.by_timestamp, shard.prefix, fields, *page)
                return script_usec(c) - before

            return call

        pages = [rng.sample(uuids, 100) for _ in range(PAGES)]
        reads = _paired([[(n, read(n, page)) for n in clients] for page in pages])
        encodings = {
            n: dict(
                sorted(
                    {
                        e: sum(1 for u in uuids[:2000] if c.object("encoding", shard.task(u)) == e)
                        for e in (b"listpack", b"hashtable")
                    }.items()
                )
            )
            for n, c in clients.items()
        }
        return {
            "tasks": tasks,
            "events": len(decoded),
            "script_usec_per_event": {n: v / len(decoded) for n, v in writes["usec"].items()},
            "writes_recommended_vs_default": writes,
            "used_memory_per_task": memory,
            "task_json_usec_per_page": {n: v / PAGES for n, v in reads["usec"].items()},
            "reads_recommended_vs_default": reads,
            "encodings_of_2000": {
                n: {k.decode(): v for k, v in e.items()} for n, e in encodings.items()
            },
        }
    finally:
        for c in clients.values():
            c.close()
        for s in servers.values():
            s.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    a = p.parse_args(argv)
    with scratch() as wd:
        out = run(a.tasks, wd)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
