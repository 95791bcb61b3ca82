"""The collector's write path without a broker: ``Decoder`` + ``Writer`` against a private Redis.

Bodies are built as a worker would publish them (one event per body, or ``task.multi`` lists
of 24), then decoded and applied in batches of ``POLLEN_BATCH_SIZE``, exactly as the collector
does. Reports events/s, where the time goes (decode, Python encoding of the Lua arguments,
Redis server time of the script from ``INFO commandstats``) and Redis bytes per task.

``python -m bench.micro --tasks 50000 [--batched] [--profile out.txt]``; ``--into REDIS_URL
--seconds S`` applies the batched stream into a running Redis instead (load for queries).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis

from bench.generator import HEARTBEAT_EVERY, IN_FLIGHT, schedule, worker_fields
from bench.systems import scratch
from services.collector.decode import Decoded, Decoder
from services.collector.writer import Writer, task_args, worker_args
from shared import events as ev
from shared.settings import Settings, load
from tests.support.servers import RedisServer

_encode = msgspec.json.encode
NAMESPACE = "micro"
SPLIT_MAX_TASKS = 200_000


def bodies(tasks: int, batched: bool, workers: int = 4, seed: int = 1) -> Iterator[bytes]:
    """Message bodies of ``tasks`` tasks, as the generator would publish them."""
    rng = random.Random(seed)
    clock = 0
    # an hour ago (to the minute): the windowed stats (the last N minutes) hold the stream
    ts = float(int(time.time() // 60) * 60 - 3600)
    per_worker = tasks // workers
    schedules = [
        schedule(rng, per_worker + (tasks % workers if w == workers - 1 else 0), f"m{w}")
        for w in range(workers)
    ]
    buffers: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    live = list(range(workers))
    n = 0
    while live:
        for k in list(live):
            try:
                slot, (kind, fields) = next(schedules[k])
            except StopIteration:
                live.remove(k)
                if buffers[k]:
                    yield _encode(buffers[k])
                    buffers[k] = []
                continue
            clock += 1
            ts += 0.0002
            host = "client@micro" if slot == -1 else f"celery@micro-w{k}"
            event = {
                "hostname": host,
                "utcoffset": 0,
                "pid": 4242,
                "clock": clock,
                **fields,
                "type": kind,
                "timestamp": ts,
            }
            n += 1
            if batched and slot != -1:
                buffers[k].append(event)
                if len(buffers[k]) >= 24:
                    yield _encode(buffers[k])
                    buffers[k] = []
            else:
                yield _encode(event)
            if n % int(HEARTBEAT_EVERY * 10_000) == 0:  # a beat per worker every ~2 s at 10k/s
                for w in range(workers):
                    clock += 1
                    beat = {
                        "hostname": f"celery@micro-w{w}",
                        "utcoffset": 0,
                        "pid": 4242,
                        "clock": clock,
                        "type": "worker-heartbeat",
                        "timestamp": ts,
                        **worker_fields(IN_FLIGHT, n // workers),
                    }
                    yield _encode(beat)


def decoded_stream(tasks: int, batched: bool, settings: Settings) -> list[Decoded]:
    """The bench stream (``bodies``) as the collector decodes it."""
    decoder = Decoder(settings.max_field_bytes)
    out: list[Decoded] = []
    for body in bodies(tasks, batched):
        out.extend(decoder.decode(body, "application/json", "utf-8", time.time()).events)
    return out


def apply_all(writer: Writer, decoded: list[Decoded], settings: Settings) -> None:
    """Apply ``decoded`` as the collector would, in batches of ``POLLEN_BATCH_SIZE``."""
    for i in range(0, len(decoded), settings.batch_size):
        writer.apply(decoded[i : i + settings.batch_size], time.time())


def flower_state_rate(tasks: int, batched: bool) -> dict[str, Any]:
    """Flower's own event handler (``EventsState.event``: celery's State merge, its search
    index and Prometheus metrics) on the same events, in this process, with no broker: an
    upper bound of what one Flower process can ingest."""
    from flower.events import EventsState

    events: list[dict[str, Any]] = []
    for body in bodies(tasks, batched):
        decoded = msgspec.json.decode(body)
        events.extend(decoded if isinstance(decoded, list) else [decoded])
    state = EventsState(max_tasks_in_memory=max(tasks * 2, 10_000))
    now = time.time()
    t = time.perf_counter()
    for event in events:
        event["local_received"] = now
        state.event(event)
    seconds = time.perf_counter() - t
    return {
        "tasks": tasks,
        "batched": batched,
        "events": len(events),
        "seconds": seconds,
        "events_per_s": len(events) / seconds,
    }


def memory_breakdown(client: redis.Redis, namespace: str, tasks: int) -> dict[str, float]:
    """Redis bytes per task by key kind: task hashes (sampled), each index/stream/other key."""
    out: dict[str, float] = {}
    sample_n = 300
    task_keys: list[bytes] = []
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        k = key if isinstance(key, bytes) else key.encode()
        if b":task:" in k:
            if len(task_keys) < sample_n:
                task_keys.append(k)
            continue
        kind = k.split(b"}:", 1)[-1].decode(errors="replace")
        for prefix in (
            "idx:state:",
            "idx:name:",
            "idx:worker:",
            "idx:sn:",
            "idx:sw:",
            "idx:exc:",
        ):
            if kind.startswith(prefix):
                kind = prefix + "*"
        if kind.startswith(
            ("children:", "minute:", "worker:", "wdedup:", "rtminute:", "failminute:", "wtminute:")
        ):
            kind = kind.split(":")[0] + ":*"
        usage = client.memory_usage(k, samples=0 if not kind.startswith("stream") else 50)
        out[kind] = out.get(kind, 0.0) + float(usage or 0) / tasks
    task_count = int(client.dbsize())  # upper bound of task keys
    if task_keys:
        sizes = [float(client.memory_usage(k, samples=0) or 0) for k in task_keys]
        per_hash = sum(sizes) / len(sizes)
        hashes = sum(1 for _ in client.scan_iter(match=f"{namespace}:*:task:*", count=5000))
        out["task:* (hash)"] = per_hash * min(hashes, task_count) / tasks
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _args(item: Decoded) -> dict[str, Any]:
    event = item.event
    if isinstance(event, ev.TaskEvent):
        return task_args(event, item.open_json)
    return worker_args(event, item.open_json, item.local_received)


def run(
    tasks: int,
    batched: bool,
    workdir: Path,
    settings_env: dict[str, str] | None = None,
    profile: Path | None = None,
    server: RedisServer | None = None,
) -> dict[str, Any]:
    """Decode and apply ``tasks`` tasks; return the measurements. With ``server``, that Redis
    is used and left running (filled); otherwise a private one is started and stopped."""
    own = server is None
    if server is None:
        server = RedisServer(workdir / "redis").start()
    client = redis.Redis(port=server.port)
    try:
        settings: Settings = load(
            {
                "POLLEN_REDIS_URL": server.url,
                "POLLEN_NAMESPACE": NAMESPACE,
                **(settings_env or {}),
            }
        )
        decoder = Decoder(settings.max_field_bytes)
        writer = Writer(client, settings)
        # big runs stream their bodies and skip the separate decode/encode timings
        split = tasks <= SPLIT_MAX_TASKS
        payload: Iterable[bytes] = list(bodies(tasks, batched)) if split else bodies(tasks, batched)
        base_memory = int(client.info("memory")["used_memory"])
        client.config_resetstat()
        decode_s = encode_s = 0.0
        if split:
            # 1. decode alone
            t = time.perf_counter()
            decoded: list[Decoded] = []
            for body in payload:
                decoded.extend(
                    decoder.decode(body, "application/json", "utf-8", time.time()).events
                )
            decode_s = time.perf_counter() - t
            # 2. the Python side of the writer alone: Lua arguments and their msgpack encoding
            t = time.perf_counter()
            for i in range(0, len(decoded), settings.batch_size):
                msgspec.msgpack.encode([_args(d) for d in decoded[i : i + settings.batch_size]])
            encode_s = time.perf_counter() - t
            del decoded

        # 3. the whole path as the collector runs it: decode a batch's bodies, apply
        profiler: Any = None
        if profile is not None:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        t = time.perf_counter()
        batch: list[Decoded] = []
        applied = duplicates = events = bodies_n = 0
        for body in payload:
            bodies_n += 1
            batch.extend(decoder.decode(body, "application/json", "utf-8", time.time()).events)
            if len(batch) >= settings.batch_size:
                events += len(batch)
                done = writer.apply(batch, time.time())
                applied += done.applied
                duplicates += done.duplicates
                batch = []
        if batch:
            events += len(batch)
            done = writer.apply(batch, time.time())
            applied += done.applied
            duplicates += done.duplicates
        total_s = time.perf_counter() - t
        if profiler is not None:
            profiler.stop()
            assert profile is not None
            profile.parent.mkdir(parents=True, exist_ok=True)
            profile.write_text(profiler.output_text(unicode=False, color=False, show_all=False))

        stats = client.info("commandstats")
        script_us = sum(
            int(v["usec"])
            for k, v in stats.items()
            if k.startswith("cmdstat_evalsha") or k == "cmdstat_eval"
        )
        used = int(client.info("memory")["used_memory"])
        breakdown = memory_breakdown(client, settings.namespace, tasks)
        stream_len = sum(int(client.xlen(s.stream)) for s in writer.keys.all_shards)
        return {
            "tasks": tasks,
            "batched": batched,
            "bodies": bodies_n,
            "events": events,
            "applied": applied,
            "duplicates": duplicates,
            "decode_events_per_s": events / decode_s if decode_s else None,
            "encode_events_per_s": events / encode_s if encode_s else None,
            "events_per_s": events / total_s,
            "seconds": total_s,
            "share": {
                "decode": decode_s / total_s if split else None,
                "python_args": encode_s / total_s if split else None,
                "redis_script": script_us / 1e6 / total_s,
                "other": max(0.0, 1 - (decode_s + encode_s + script_us / 1e6) / total_s)
                if split
                else None,
            },
            "redis_used_memory": used,
            "redis_bytes_per_task": (used - base_memory) / tasks,
            "memory_breakdown": breakdown,
            "stream_len": stream_len,
            "stream_maxlen": settings.stream_maxlen,
        }
    finally:
        client.close()
        if own:
            server.stop()


def ingest(redis_url: str, seconds: float, seed: int, settings_env: dict[str, str]) -> None:
    """Apply the batched bench stream (tasks of ``seed``, new uuids) into ``redis_url`` as fast
    as one writer can, for ``seconds``: the load under which the scale scenario times queries.
    Prints ``applying`` once the first batch is in, then the events applied and their rate."""
    settings = load({"POLLEN_REDIS_URL": redis_url, "POLLEN_NAMESPACE": NAMESPACE, **settings_env})
    decoder = Decoder(settings.max_field_bytes)
    writer = Writer(redis.Redis.from_url(redis_url, socket_timeout=60), settings)
    batch: list[Decoded] = []
    events = 0
    started = time.perf_counter()
    for body in bodies(10_000_000, True, seed=seed):
        batch.extend(decoder.decode(body, "application/json", "utf-8", time.time()).events)
        if len(batch) >= settings.batch_size:
            writer.apply(batch, time.time())
            if not events:
                print("applying", flush=True)
            events += len(batch)
            batch = []
            if time.perf_counter() - started >= seconds:
                break
    took = time.perf_counter() - started
    # ``ended``: wall-clock time, to compare with the queries' end in the parent
    print(
        json.dumps(
            {"events": events, "seconds": took, "events_per_s": events / took, "ended": time.time()}
        )
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=50_000)
    p.add_argument("--batched", action="store_true")
    p.add_argument("--profile", type=Path, help="write a pyinstrument profile of the apply loop")
    p.add_argument("--into", metavar="REDIS_URL", help="ingest into this Redis for --seconds")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=2)
    a = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k.startswith("POLLEN_")}
    if a.into:
        ingest(a.into, a.seconds, a.seed, env)
        return
    with scratch() as wd:
        out = run(a.tasks, a.batched, wd, env, a.profile)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
