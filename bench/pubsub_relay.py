"""What a subscriber of ``<ns>:events`` (an API replica's hub, the enabler) spends per event:
one pub/sub message per event, as collectors published before, against one per script call,
a line ``<stream id> <entry>`` per event, turned into events by
``shared.events.published_events``.

The same normalized events (the bench stream, through the collector's write path) are
published both ways into one Redis; a subprocess reads them with redis-py's asyncio pub/sub,
as the hub does, and reports its CPU time per event.

``python -m bench.pubsub_relay --tasks 20000``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from bench.micro import apply_all, decoded_stream
from bench.systems import scratch
from services.collector.writer import Writer
from shared.settings import load
from tests.support.servers import ROOT, RedisServer

#: The reader: subscribes, says so, then reads until ``events`` events arrived (the hub's loop:
#: a message, then what is already buffered, each split into its events).
_READER = """
import asyncio, json, sys, time
import redis.asyncio as aioredis
from shared.events import published_events

async def main(port, channel, events):
    client = aioredis.Redis(port=port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    print("ready", flush=True)
    got, started = 0, None
    while got < events:
        message = await pubsub.get_message(timeout=1.0)
        if message is None:
            continue
        if started is None:
            started = time.process_time()
        got += len(published_events(message["data"]))
    print(json.dumps({"cpu_s": time.process_time() - started, "events": got}), flush=True)
    await pubsub.aclose()
    await client.aclose()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""


def _events(tasks: int, port: int) -> list[tuple[bytes, bytes]]:
    """The bench stream's normalized events, ``(stream id, entry)``, as the collector writes
    them (read back from its stream)."""
    client = redis.Redis(port=port)
    settings = load({"POLLEN_REDIS_URL": f"redis://127.0.0.1:{port}/0", "POLLEN_NAMESPACE": "ps"})
    writer = Writer(client, settings)
    apply_all(writer, decoded_stream(tasks, True, settings), settings)
    out = []
    for shard in writer.keys.all_shards:
        entries: Any = client.xrange(shard.stream)
        for sid, fields in entries:
            out.append((sid, fields[b"e"]))
    client.flushall()
    client.close()
    return out


def _read_cpu(port: int, messages: list[bytes], events: int) -> float:
    """CPU seconds the reader spends per event on ``messages``."""
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(port), "bench:relay", str(events)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "ready"
    client = redis.Redis(port=port)
    pipe = client.pipeline(transaction=False)
    for i, m in enumerate(messages):
        pipe.publish("bench:relay", m)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    result = json.loads(reader.stdout.readline())
    reader.wait(30)
    client.close()
    assert result["events"] == events, result
    return float(result["cpu_s"]) / events


def run(tasks: int, batch: int, rounds: int, workdir: Path) -> dict[str, Any]:
    server = RedisServer(workdir / "redis-relay").start()
    try:
        entries = _events(tasks, server.port)
        # as collectors published before: the entry plus stream_id, a message each
        events = [entry[:-1] + b',"stream_id":"' + sid + b'"}' for sid, entry in entries]
        # as apply_events.lua publishes now: a line '<stream id> <entry>' per event
        lines = [sid + b" " + entry for sid, entry in entries]
        per_call = [b"\n".join(lines[i : i + batch]) for i in range(0, len(lines), batch)]
        usec: dict[str, list[float]] = {"per_event": [], "per_call": []}
        for _ in range(rounds):
            usec["per_event"].append(_read_cpu(server.port, events, len(events)) * 1e6)
            usec["per_call"].append(_read_cpu(server.port, per_call, len(events)) * 1e6)
        return {
            "tasks": tasks,
            "events": len(events),
            "events_per_call": batch,
            "rounds": rounds,
            "reader_cpu_usec_per_event": usec,
            "median": {k: sorted(v)[len(v) // 2] for k, v in usec.items()},
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500, help="events per script call")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    with scratch() as wd:
        json.dump(run(a.tasks, a.batch, a.rounds, wd), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
