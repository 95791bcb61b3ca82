"""Where ``apply_events.lua`` spends its time inside Redis.

A copy of the script (the shipped one is not touched) has every ``redis.call`` wrapped with
``TIME`` probes, summed per command name into a scratch hash. The plain script's time
(``INFO commandstats``) minus the commands' time (less the probes' own cost) is the Lua logic.

``python -m bench.lua_profile --tasks 20000``

``--against REV`` instead compares this tree's script and Lua arguments with those of git
revision ``REV`` on the same events, paired: both run in one Redis (two namespaces), batch by
batch in alternating order, each call timed by ``INFO commandstats``, so the machine's noise
(other processes on the cores) falls on both alike. A change to ``apply_events.lua`` or to
``services/collector/writer.py`` is measured this way:

``python -m bench.lua_profile --tasks 20000 --batched --against main --rounds 5``

``--sections steps`` (or ``parts``, or function names) instead wraps top-level functions of the
script in ``TIME`` probes: where the Lua logic's time goes, function by function.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import redis

from bench.micro import apply_all, decoded_stream
from bench.systems import scratch
from services.collector.writer import Writer
from shared import scripts
from shared.settings import load
from tests.support.servers import ROOT, RedisServer

PROFILE_KEY = "bench:lua:usec"
CALLS_KEY = "bench:lua:calls"

_PRELUDE = """
local _rc = redis.call
local _T, _C = {}, {}
local function RC(cmd, ...)
  local a = _rc('TIME')
  local r = _rc(cmd, ...)
  local b = _rc('TIME')
  local name = string.upper(cmd)
  _T[name] = (_T[name] or 0) + (b[1] - a[1]) * 1000000 + (b[2] - a[2])
  _C[name] = (_C[name] or 0) + 1
  return r
end
"""
_EPILOGUE = f"""
for k, v in pairs(_T) do _rc('HINCRBY', '{PROFILE_KEY}', k, v) end
for k, v in pairs(_C) do _rc('HINCRBY', '{CALLS_KEY}', k, v) end
"""


#: Reads run, writes answer a dummy: what is left is unpacking, reading and the Lua logic.
_STUB_WRITES = """
local _rc = redis.call
local _READS = { HGETALL = 1, HMGET = 1, HGET = 1, ZCARD = 1, SMEMBERS = 1, ZRANGE = 1,
                 ZRANGEBYSCORE = 1, ZSCORE = 1, EXISTS = 1, TIME = 1 }
local function RC(cmd, ...)
  local c = string.upper(cmd)
  if _READS[c] then return _rc(cmd, ...) end
  if c == 'XADD' then return '0-0' end
  if c == 'ZADD' and select(2, ...) == 'NX' then return 1 end
  return 0
end
"""
_UNPACK = "local events = cmsgpack.unpack(ARGV[3])"


def writes_stubbed(source: str) -> str:
    return _STUB_WRITES + source.replace("redis.call(", "RC(")


def unpack_only(source: str) -> str:
    head, found, _ = source.partition(_UNPACK)
    if not found:
        raise ValueError("apply_events.lua no longer unpacks ARGV[3] as expected")
    return head + _UNPACK + "\nreturn {#events, 0, 0}\n"


def instrumented(source: str) -> str:
    body = source.replace("redis.call(", "RC(")
    last = body.rstrip().rfind("\nreturn ")
    if last == -1:
        raise ValueError("apply_events.lua does not end with a return statement")
    # the prelude goes after the header comment so line numbers in errors stay near
    return _PRELUDE + body[:last] + "\n" + _EPILOGUE + body[last:]


#: What ``--sections`` times by default: the per-call steps, then what they call per event.
SECTIONS = {
    "steps": ["load_task", "apply_task", "save_task", "settle_lost", "flush_counters"],
    "parts": [
        "emit",
        "count",
        "new_entry",
        "fold",
        "in_order",
        "settle_waits",
        "group_keys",
        "prefetch_times",
        "format_entry",
    ],
}

_SECTION_PRELUDE = """
local _rc = redis.call
local _T, _C = {}, {}
local function _timed(name, f)
  return function(...)
    local a = _rc('TIME')
    local r1, r2, r3 = f(...)
    local b = _rc('TIME')
    _T[name] = (_T[name] or 0) + (b[1] - a[1]) * 1000000 + (b[2] - a[2])
    _C[name] = (_C[name] or 0) + 1
    return r1, r2, r3
  end
end
"""


def sectioned(source: str, names: list[str]) -> str:
    """The script with each named top-level ``local function`` wrapped in ``TIME`` probes
    (inclusive of what it calls; Lua closures see the wrapped one through the local)."""
    for name in names:
        found = re.search(rf"^local function {name}\(.*?^end\n", source, re.S | re.M)
        if not found:
            raise ValueError(f"apply_events.lua has no top-level function {name}")
        end = found.end()
        source = source[:end] + f"{name} = _timed('{name}', {name})\n" + source[end:]
    last = source.rstrip().rfind("\nreturn ")
    return _SECTION_PRELUDE + source[:last] + "\n" + _EPILOGUE + source[last:]


def sections(tasks: int, batched: bool, names: list[str], workdir: Path) -> dict[str, Any]:
    """Per event: the plain script's time, and each named function's time (inclusive, the
    probes' cost taken off; nested wrapped calls add their probes to their callers, so time
    one level at a time)."""
    server = RedisServer(workdir / "redis-sections").start()
    client = redis.Redis(port=server.port)
    try:
        settings = load({"POLLEN_REDIS_URL": server.url, "POLLEN_NAMESPACE": "prof"})
        decoded = decoded_stream(tasks, batched, settings)
        plain = 0.0
        for variant in ("plain", "sectioned"):
            client.flushall()
            writer = Writer(client, settings)
            if variant == "sectioned":
                source = sectioned(scripts.source("apply_events"), names)
                writer.script = client.register_script(source)
            client.config_resetstat()
            apply_all(writer, decoded, settings)
            if variant == "plain":
                plain = script_usec(client) / len(decoded)
        usec = {_s(k): int(v) for k, v in client.hgetall(PROFILE_KEY).items()}
        calls = {_s(k): int(v) for k, v in client.hgetall(CALLS_KEY).items()}
        probe = _time_probe_usec(client)
        events = len(decoded)
        return {
            "tasks": tasks,
            "batched": batched,
            "events": events,
            "script_usec_per_event": plain,
            "probe_usec": probe,
            "sections": {
                name: {
                    "calls_per_event": calls[name] / events,
                    "usec_per_event": max(0.0, usec[name] - calls[name] * probe) / events,
                }
                for name in sorted(usec, key=lambda n: -usec[n])
            },
        }
    finally:
        client.close()
        server.stop()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def script_usec(client: redis.Redis) -> int:
    """Microseconds Redis has spent in EVALSHA calls since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    return sum(int(v["usec"]) for k, v in stats.items() if k.startswith("cmdstat_evalsha"))


def _time_probe_usec(client: redis.Redis, n: int = 200_000) -> float:
    """The cost of one TIME probe inside a script (what the wrapper adds per call, halved)."""
    client.config_resetstat()
    client.eval(f"for i = 1, {n} do redis.call('TIME') end return 1", 0)
    stats = client.info("commandstats")
    return int(stats["cmdstat_eval"]["usec"]) / n


def run(tasks: int, batched: bool, workdir: Path) -> dict[str, Any]:
    server = RedisServer(workdir / "redis-lua").start()
    client = redis.Redis(port=server.port)
    try:
        settings = load({"POLLEN_REDIS_URL": server.url, "POLLEN_NAMESPACE": "prof"})
        decoded = decoded_stream(tasks, batched, settings)
        results = {}
        source = scripts.source("apply_events")
        variants = {
            "writes_stubbed": writes_stubbed,
            "unpack_only": unpack_only,
            "instrumented": instrumented,  # last: its probe hashes are read below
        }
        for variant in ("plain", *variants):
            client.flushall()
            writer = Writer(client, settings)
            if variant in variants:
                writer.script = client.register_script(variants[variant](source))
            client.config_resetstat()
            t = time.perf_counter()
            apply_all(writer, decoded, settings)
            wall = time.perf_counter() - t
            results[variant] = (wall, script_usec(client))
        usec = {_s(k): int(v) for k, v in client.hgetall(PROFILE_KEY).items()}
        calls = {_s(k): int(v) for k, v in client.hgetall(CALLS_KEY).items()}
        probe = _time_probe_usec(client)
        events = len(decoded)
        plain_wall, plain_script = results["plain"]
        total_calls = sum(calls.values())
        commands_usec = sum(usec.values())
        # each wrapped call costs two TIME probes, one of which falls inside the interval
        commands_net = commands_usec - total_calls * probe
        # the Lua logic: the plain script's time less what its commands cost
        logic_usec = plain_script - commands_net
        per_event = {
            name: {
                "calls_per_event": calls[name] / events,
                "usec_per_event": max(0.0, usec[name] - calls[name] * probe) / events,
            }
            for name in sorted(usec, key=lambda n: -usec[n])
        }
        return {
            "tasks": tasks,
            "batched": batched,
            "events": events,
            "events_per_s": events / plain_wall,
            "script_usec_per_event": plain_script / events,
            "commands_usec_per_event": commands_net / events,
            "lua_logic_usec_per_event": max(0.0, logic_usec) / events,
            "redis_calls_per_event": total_calls / events,
            # ablation: the same batches with writes answered by a dummy, and unpacking alone
            "unpack_usec_per_event": results["unpack_only"][1] / events,
            "reads_and_logic_usec_per_event": (
                results["writes_stubbed"][1] - results["unpack_only"][1]
            )
            / events,
            "writes_usec_per_event": (plain_script - results["writes_stubbed"][1]) / events,
            "probe_usec": probe,
            "per_command": per_event,
        }
    finally:
        client.close()
        server.stop()


#: Run in a tree's own code (PYTHONPATH): its apply_events source and, per batch, the calls its
#: Writer prepares. Only APIs every revision has: bodies, Decoder, Writer.prepare, source.
_DUMP_CALLS = """
import sys
import msgspec, redis
from bench.micro import bodies
from services.collector.decode import Decoder
from services.collector.writer import Writer
from shared import scripts
from shared.settings import load

tasks, batched, namespace = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
settings = load({"POLLEN_NAMESPACE": namespace})
decoder = Decoder(settings.max_field_bytes)
decoded = []
for body in bodies(tasks, batched):
    decoded.extend(decoder.decode(body, "application/json", "utf-8", 1.79e9).events)
writer = Writer(redis.Redis(), settings)  # prepare() is pure: nothing connects
batches = []
for i in range(0, len(decoded), settings.batch_size):
    prepared = writer.prepare(decoded[i : i + settings.batch_size], 1.79e9)
    batches.append([[s.stream, s.prefix, c, p] for s, c, p in prepared.calls])
out = {"source": scripts.source("apply_events"), "events": len(decoded), "batches": batches}
sys.stdout.buffer.write(msgspec.msgpack.encode(out))
"""


def _calls(tree: Path, tasks: int, batched: bool, namespace: str) -> Any:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-c", _DUMP_CALLS, str(tasks), "1" if batched else "0", namespace]
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, check=True)
    return msgspec.msgpack.decode(done.stdout)


def _export(rev: str, dest: Path) -> Path:
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(dest, filter="data")
    return dest


def _listeners(port: int, count: int) -> tuple[threading.Event, list[threading.Thread]]:
    """``count`` pub/sub clients on every channel (``PSUBSCRIBE *``), as API replicas and the
    enabler are, each reading and dropping what it gets until the event is set."""
    stop = threading.Event()
    ready = threading.Barrier(count + 1)

    def listen() -> None:
        client = redis.Redis(port=port)
        pubsub = client.pubsub()
        pubsub.psubscribe("*")
        pubsub.get_message(timeout=5)  # the subscription's confirmation
        ready.wait()
        while not stop.is_set():
            pubsub.get_message(timeout=0.2)
        pubsub.close()
        client.close()

    threads = [threading.Thread(target=listen, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    ready.wait()
    return stop, threads


def compare(
    against: str, tasks: int, batched: bool, rounds: int, workdir: Path, subscribers: int = 0
) -> dict[str, Any]:
    """Script time per event of revision ``against`` and of this tree, paired (see above);
    with ``subscribers`` pub/sub clients listening (Redis writes each message to each)."""
    trees = {"against": _export(against, workdir / "against"), "current": ROOT}
    dumps = {name: _calls(tree, tasks, batched, f"cmp-{name}") for name, tree in trees.items()}
    events = dumps["current"]["events"]
    if dumps["against"]["events"] != events:
        raise ValueError(f"{against} decodes {dumps['against']['events']} events, not {events}")
    server = RedisServer(workdir / "redis-compare").start()
    client = redis.Redis(port=server.port)
    stop, threads = _listeners(server.port, subscribers) if subscribers else (None, [])
    try:
        shas = {name: client.script_load(d["source"]) for name, d in dumps.items()}
        usec: dict[str, list[float]] = {name: [] for name in dumps}
        # per batch, current / against: a burst of load elsewhere hits one pair, not a round
        ratios: list[float] = []
        pairs = list(zip(dumps["against"]["batches"], dumps["current"]["batches"], strict=True))
        for _ in range(rounds):
            client.flushall()
            total = dict.fromkeys(dumps, 0)
            for i, pair in enumerate(pairs):
                named = list(zip(dumps, pair, strict=True))
                took = {}
                for name, calls in named if i % 2 == 0 else reversed(named):
                    before = script_usec(client)
                    for stream, prefix, config, packed in calls:
                        client.evalsha(shas[name], 1, stream, prefix, config, packed)
                    took[name] = script_usec(client) - before
                    total[name] += took[name]
                ratios.append(took["current"] / max(1, took["against"]))
            for name in dumps:
                usec[name].append(total[name] / events)
        quartiles = statistics.quantiles(ratios, n=4)
        return {
            "against": against,
            "tasks": tasks,
            "batched": batched,
            "events": events,
            "rounds": rounds,
            "subscribers": subscribers,
            "script_usec_per_event": usec,
            "median_usec_per_event": {n: statistics.median(v) for n, v in usec.items()},
            # the median batch's change and the middle half of the batches' changes
            "current_vs_against": {
                "median": quartiles[1] - 1,
                "p25": quartiles[0] - 1,
                "p75": quartiles[2] - 1,
                "batches": len(ratios),
            },
            "arg_bytes_per_event": {
                name: sum(len(call[3]) for calls in d["batches"] for call in calls) / events
                for name, d in dumps.items()
            },
        }
    finally:
        if stop is not None:
            stop.set()
            for t in threads:
                t.join(5)
        client.close()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--batched", action="store_true")
    p.add_argument("--against", metavar="REV", help="compare with git revision REV, paired")
    p.add_argument("--rounds", type=int, default=5, help="with --against: passes over the events")
    p.add_argument(
        "--subscribers", type=int, default=0, help="with --against: pub/sub clients listening"
    )
    p.add_argument(
        "--sections",
        metavar="NAMES",
        help="time these top-level Lua functions (comma-separated, or "
        + " / ".join(SECTIONS)
        + ")",
    )
    a = p.parse_args(argv)
    with scratch() as wd:
        if a.sections:
            names = SECTIONS.get(a.sections) or a.sections.split(",")
            out = sections(a.tasks, a.batched, names, wd)
        elif a.against:
            out = compare(a.against, a.tasks, a.batched, a.rounds, wd, a.subscribers)
        else:
            out = run(a.tasks, a.batched, wd)
        json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
