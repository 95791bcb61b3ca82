"""What a task hash holds in Redis: ``MEMORY USAGE`` and encoding of a sample of task hashes,
and the bytes of each field (name and value), after the bench stream went through the
collector's write path into a private Redis.

``python -m bench.task_memory --tasks 20000``
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

import redis

from bench.micro import apply_all, decoded_stream
from bench.systems import scratch
from services.collector.writer import Writer
from shared.settings import load
from tests.support.servers import RedisServer


def run(tasks: int, sample: int, batched: bool, workdir: Path) -> dict[str, Any]:
    server = RedisServer(workdir / "redis-memory").start()
    client = redis.Redis(port=server.port)
    try:
        settings = load({"POLLEN_REDIS_URL": server.url, "POLLEN_NAMESPACE": "mem"})
        writer = Writer(client, settings)
        apply_all(writer, decoded_stream(tasks, batched, settings), settings)
        keys = [k for s in writer.keys.all_shards for k in client.scan_iter(s.task("*"), 1000)]
        picked = keys[:sample]
        encodings: collections.Counter[str] = collections.Counter()
        field_bytes: collections.Counter[str] = collections.Counter()
        usage = 0
        for key in picked:
            encoding: Any = client.object("encoding", key)
            encodings[encoding.decode()] += 1
            usage += int(client.memory_usage(key, samples=0) or 0)
            fields: Any = client.hgetall(key)
            for f, v in fields.items():
                field_bytes[f.decode()] += len(f) + len(v)
        n = len(picked)
        return {
            "tasks": len(keys),
            "sampled": n,
            "memory_usage_bytes_per_task_hash": usage / n,
            "encodings": dict(encodings),
            "field_bytes_per_task": {
                f: round(b / n, 1) for f, b in sorted(field_bytes.items(), key=lambda x: -x[1])
            },
        }
    finally:
        client.close()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--sample", type=int, default=2_000)
    p.add_argument("--unbatched", action="store_true")
    a = p.parse_args(argv)
    with scratch() as wd:
        json.dump(run(a.tasks, a.sample, not a.unbatched, wd), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
