"""Where ``apply_events.lua`` spends its time inside Redis.

A copy of the script (the shipped one is not touched) has every ``redis.call`` wrapped with
``TIME`` probes, summed per command name into a scratch hash. The plain script's time
(``INFO commandstats``) minus the commands' time (less the probes' own cost) is the Lua logic.

``python -m bench.lua_profile --tasks 20000``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import redis

from bench.micro import bodies
from bench.systems import scratch
from services.collector.decode import Decoded, Decoder
from services.collector.writer import Writer
from shared import scripts
from shared.settings import load
from tests.support.servers import RedisServer

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


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _script_usec(client: redis.Redis) -> int:
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
        decoder = Decoder(settings.max_field_bytes)
        decoded: list[Decoded] = []
        for body in bodies(tasks, batched):
            decoded.extend(decoder.decode(body, "application/json", "utf-8", time.time()).events)
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
            for i in range(0, len(decoded), settings.batch_size):
                writer.apply(decoded[i : i + settings.batch_size], time.time())
            wall = time.perf_counter() - t
            results[variant] = (wall, _script_usec(client))
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--batched", action="store_true")
    a = p.parse_args(argv)
    with scratch() as wd:
        json.dump(run(a.tasks, a.batched, wd), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
