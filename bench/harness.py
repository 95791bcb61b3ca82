"""``python -m bench [--quick]``: every scenario, Flower and Pollen one after the other on the
same synthetic event stream; results in ``bench/out/results.json``, then BENCHMARKS.md.

Each scenario writes its results as soon as it ends, so an interrupted run still reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from bench import http, lua_profile, micro
from bench.catalog import BEYOND_FLOWER, MIXED, SCENARIOS
from bench.generator import EXCEPTION, GenConfig, GenResult, events_per_task, generate
from bench.systems import (
    ROOT,
    Broker,
    Flower,
    Pollen,
    System,
    api_process,
    broker,
    cpu_seconds,
    rss,
    scratch,
    wait_drained,
)
from shared.events import exception_class
from shared.keys import Keys
from tests.support.replies import raw_list
from tests.support.servers import RedisServer, rabbitmq_available

OUT = ROOT / "bench" / "out"


@dataclass(frozen=True)
class Sizes:
    repeats: int
    burst_tasks: int
    sustained_rates: tuple[int, ...]
    sustained_seconds: float
    backlog_tasks: int
    memory_tasks: int
    fill_rate: float  # events/s for the memory fill, below Flower's sustained rate
    scale_tasks: int  # Pollen alone (the 1M point)
    query_repeats: int
    ws_runs: tuple[tuple[int, int], ...]  # (clients, events/s)
    ws_seconds: float
    load_seconds: float


QUICK = Sizes(
    repeats=1,
    burst_tasks=3_000,
    sustained_rates=(2_000, 5_000),
    sustained_seconds=5,
    backlog_tasks=5_000,
    memory_tasks=5_000,
    fill_rate=3_000,
    scale_tasks=20_000,
    query_repeats=20,
    ws_runs=((50, 1_000),),
    ws_seconds=4,
    load_seconds=4,
)
FULL = Sizes(
    repeats=3,
    burst_tasks=15_000,
    sustained_rates=(1_000, 2_000, 4_000, 6_000, 8_000),
    sustained_seconds=10,
    backlog_tasks=30_000,
    memory_tasks=100_000,
    fill_rate=3_000,
    scale_tasks=1_000_000,
    query_repeats=200,
    ws_runs=((500, 100), (500, 1_000), (20, 1_000), (1, 1_000)),
    ws_seconds=10,
    load_seconds=10,
)


class Run:
    """The results document, saved after every scenario."""

    def __init__(self, path: Path, sizes: Sizes, mode: str, argv: list[str]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {
            "meta": meta(mode, sizes, argv),
            "errors": [],
        }

    def put(self, key: str, value: Any) -> None:
        self.doc[key] = value
        self.save()

    def add(self, key: str, row: dict[str, Any]) -> None:
        self.doc.setdefault(key, []).append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.path)


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def meta(mode: str, sizes: Sizes, argv: list[str]) -> dict[str, Any]:
    import aiohttp
    import celery
    import flower
    import kombu
    import msgspec

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": mode,
        "command": "make bench" + (" BENCH_ARGS=--quick" if mode == "quick" else ""),
        "argv": shlex.join([sys.executable, "-m", "bench", *argv]),
        "commit": commit,
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "os": platform.platform(),
            "load_at_start": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "celery": celery.__version__,
            "kombu": kombu.__version__,
            "flower": flower.__version__,
            "redis-py": redis.__version__,
            "msgspec": msgspec.__version__,
            "aiohttp": aiohttp.__version__,
            "redis-server": _version(["redis-server", "--version"]),
            "rabbitmq": _version(["rabbitmqctl", "-q", "version"]),
        },
        "sizes": sizes.__dict__,
    }


# --- systems -------------------------------------------------------------------------------


def make_system(name: str, b: Broker, workdir: Path, max_tasks: int) -> System:
    if name == "flower":
        return Flower(b.url, workdir / "flower", max_tasks=max(2 * max_tasks, 10_000))
    collectors = int(name.split("-")[1])
    return Pollen(b.url, workdir / name, collectors)


def systems_for(kind: str) -> list[str]:
    return ["flower", "pollen-1", "pollen-2"]


def brokers() -> list[str]:
    return ["rabbitmq", "redis"] if rabbitmq_available() else ["redis"]


def one_stream(
    kind: str,
    name: str,
    config: GenConfig,
    idle: float = 4.0,
) -> dict[str, Any]:
    """Start a fresh broker and system, send ``config``'s stream, wait until it is counted."""
    with scratch() as wd, broker(kind, wd) as b:
        system = make_system(name, b, wd, config.tasks)
        try:
            b.wait_consumers(system.consumers())
            config = replace(config, broker=b.url)
            before = system.memory()
            gen = generate(config)
            counted, drain = wait_drained(
                lambda: system.counted().task_events,
                gen.task_events,
                gen.finished,
                idle=idle,
                backlog=b.backlog,
            )
            after = system.memory()
        finally:
            system.stop()
    return {
        "broker": kind,
        "mode": "batched" if config.batched else "unbatched",
        "system": name,
        "label": system.label,
        "tasks": config.tasks,
        "rate_target": config.rate,
        "sent": gen.task_events,
        "counted": counted,
        "loss": 1 - counted / gen.task_events if gen.task_events else 0.0,
        "send_seconds": gen.seconds,
        "offered_rate": gen.task_events / gen.seconds if gen.seconds else 0.0,
        "drain_seconds": drain,
        "ingest_rate": counted / (gen.seconds + drain) if gen.seconds + drain else 0.0,
        "messages": gen.messages,
        "memory_before": before,
        "memory_after": after,
    }


# --- scenarios -----------------------------------------------------------------------------


def scenario_micro(run: Run, sizes: Sizes) -> None:
    tasks = sizes.memory_tasks
    with scratch() as wd:
        for batched in (False, True):
            prof = OUT / f"profile_writer_{'batched' if batched else 'unbatched'}.txt"
            row = micro.run(tasks, batched, wd / f"m{batched}", profile=prof)
            row["profile"] = str(prof.relative_to(ROOT))
            run.add("micro", row)
            run.add("flower_state", micro.flower_state_rate(tasks, batched))
        run.put("lua_profile", lua_profile.run(min(tasks, 20_000), True, wd))


def scenario_ingest(run: Run, sizes: Sizes) -> None:
    """Full speed bursts: events sent vs counted, time to drain."""
    for kind in brokers():
        for batched in (False, True):
            for rep in range(sizes.repeats):
                for name in systems_for(kind):
                    config = GenConfig(
                        broker="",
                        tasks=sizes.burst_tasks,
                        batched=batched,
                        procs=2 if kind == "redis" else 1,
                        seed=rep + 1,
                        tag=f"b{rep}",
                    )
                    try:
                        row = one_stream(kind, name, config)
                    except Exception as exc:
                        run.add("errors", {"scenario": f"ingest {kind} {name}", "error": repr(exc)})
                        continue
                    row["repeat"] = rep
                    run.add("ingest", row)
                    _log(row)


def scenario_sustained(run: Run, sizes: Sizes) -> None:
    """Fixed send rates, rising, until loss (or lag) appears; RabbitMQ, unbatched."""
    kind = brokers()[0]
    for name in systems_for(kind):
        for rate in sizes.sustained_rates:
            tasks = max(200, int(rate * sizes.sustained_seconds / events_per_task()))
            config = GenConfig(broker="", tasks=tasks, rate=float(rate), tag="s")
            row = one_stream(kind, name, config)
            run.add("sustained", row)
            _log(row)
            # the generator itself cannot go faster on this machine
            if row["offered_rate"] < 0.8 * rate:
                break


def scenario_backlog(run: Run, sizes: Sizes) -> None:
    """Pollen alone: a backlog in its durable queue, drained by 1 and 2 collectors.

    The stream is published while the collectors are stopped, so the drain rate is the
    collectors' own ingest rate, without the generator competing for the CPU."""
    if "rabbitmq" not in brokers():
        return
    for batched in (False, True):
        for collectors in (1, 2):
            for rep in range(sizes.repeats):
                with scratch() as wd, broker("rabbitmq", wd) as b:
                    pollen = Pollen(b.url, wd / "pollen", collectors)
                    try:
                        b.wait_consumers(collectors)
                        pollen.stop_collectors()
                        gen = generate(
                            GenConfig(
                                broker=b.url,
                                tasks=sizes.backlog_tasks,
                                batched=batched,
                                seed=rep + 1,
                                tag=f"q{rep}",
                            )
                        )
                        queued = b.backlog()
                        pollen.start_collectors()
                        first, last, counted = _drain_times(pollen, gen.task_events)
                        mem = pollen.memory()
                    finally:
                        pollen.stop()
                row = {
                    "mode": "batched" if batched else "unbatched",
                    "collectors": collectors,
                    "repeat": rep,
                    "sent": gen.task_events,
                    "messages_queued": queued,
                    "counted": counted,
                    "seconds": last - first,
                    "rate": counted / (last - first) if last > first else 0.0,
                    "memory_after": mem,
                }
                run.add("backlog", row)
                _log(row)


def _drain_times(system: System, expected: int, timeout: float = 900) -> tuple[float, float, int]:
    """(time of the first applied event, time the last was applied, count)."""
    first = 0.0
    count = 0
    last_change = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = system.counted().task_events
        now = time.time()
        if n and not first:
            first = now
        if n != count:
            count, last_change = n, now
        if count >= expected or (first and now - last_change > 10):
            break
        time.sleep(0.05)
    return first, last_change, count


def query_paths(uuids: list[str], tasks: int) -> dict[str, list[str]]:
    """Flower-compatible reads, the same on both systems."""
    return {
        "tasks (default sort)": ["/api/tasks?limit=100"],
        "tasks state=FAILURE": ["/api/tasks?limit=100&state=FAILURE"],
        "tasks taskname=": ["/api/tasks?limit=100&taskname=proj.billing.charge_card"],
        "tasks deep offset": [f"/api/tasks?limit=100&offset={tasks // 2}"],
        "tasks search=": ["/api/tasks?limit=100&search=charge_card"],
        "task/info": [f"/api/task/info/{u}" for u in uuids],
    }


def task_events_of(system: System) -> Callable[[], int]:
    """``wait_drained``'s count: the task events ``system`` has counted so far."""
    return lambda: system.counted().task_events


def _uuids(base: str, n: int = 50) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/api/tasks?limit=1000", timeout=120) as resp:
        keys = list(json.loads(resp.read()).keys())
    random.Random(7).shuffle(keys)
    return keys[:n]


def scenario_memory(run: Run, sizes: Sizes) -> None:
    """The same stream (no loss: a rate Flower keeps up with) into Flower, then into Pollen:
    memory per task, query latency, and a mixed read load (Pollen: 1 and 2 API replicas)."""
    kind = brokers()[0]
    tasks = sizes.memory_tasks
    config = GenConfig(broker="", tasks=tasks, rate=sizes.fill_rate, tag="m", seed=42)
    uuids: list[str] = []
    for name in ("flower", "pollen-1"):
        with scratch() as wd, broker(kind, wd) as b:
            system = make_system(name, b, wd, tasks)
            try:
                b.wait_consumers(system.consumers())
                time.sleep(1.0)
                before = system.memory()
                gen = generate(replace(config, broker=b.url))
                counted, _ = wait_drained(
                    task_events_of(system),
                    gen.task_events,
                    gen.finished,
                    backlog=b.backlog,
                )
                time.sleep(1.0)
                after = system.memory()
                row: dict[str, Any] = {
                    "system": name,
                    "label": system.label,
                    "tasks": tasks,
                    "sent": gen.task_events,
                    "counted": counted,
                    "memory_before": before,
                    "memory_after": after,
                }
                if isinstance(system, Flower):
                    base = system.base
                    row["bytes_per_task"] = (after["rss"] - before["rss"]) / tasks
                    if not uuids:
                        uuids = _uuids(base)
                    timings = http.time_paths(base, query_paths(uuids, tasks), sizes.query_repeats)
                    row["load_1"] = http.load([base], MIXED, sizes.load_seconds, 16)
                    row["rss_after_queries"] = rss(system.pids())
                else:
                    assert isinstance(system, Pollen)
                    row["bytes_per_task"] = (after["redis"] - before["redis"]) / tasks
                    row["collector_rss"] = after["rss"]
                    bases = system.start_api(2)
                    timings = http.time_paths(
                        bases[0], query_paths(uuids, tasks), sizes.query_repeats
                    )
                    row["load_1"] = http.load(bases[:1], MIXED, sizes.load_seconds, 16)
                    row["load_2"] = http.load(bases, MIXED, sizes.load_seconds, 16)
                    row["api_rss"] = rss(system.api_pids()[:1])
                    row["redis_rss"] = after.get("redis_rss", 0)
                row["queries"] = timings
            finally:
                system.stop()
        run.add("memory", row)
        _log({k: v for k, v in row.items() if k not in ("queries",)})


#: The listing the issue's latency target names, and an indexed filter beside it.
LISTINGS = {
    "tasks (default sort)": ["/api/tasks?limit=100"],
    "tasks taskname=": ["/api/tasks?limit=100&taskname=proj.billing.charge_card"],
}
#: Seconds of full-speed ingest the listings are timed under (they take a few).
INGEST_SECONDS = 30.0


def _listings(base: str, redis_url: str, shards: int, repeats: int) -> dict[str, Any]:
    """``LISTINGS`` timed on a quiet machine, then while one writer applies the batched bench
    stream (new tasks: the oldest are evicted) as fast as it can, in a process of its own."""
    out: dict[str, Any] = {"quiet": http.time_paths(base, LISTINGS, repeats)}
    env = {**os.environ, "POLLEN_SHARDS": str(shards)}
    args = ["--into", redis_url, "--seconds", str(INGEST_SECONDS), "--seed", str(1 + shards)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.micro", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if first != "applying":
            raise RuntimeError(f"the ingest did not start: {first!r}")
        started = time.monotonic()
        out["under_ingest"] = http.time_paths(base, LISTINGS, repeats)
        out["queries_seconds"] = time.monotonic() - started
        queries_ended = time.time()
        out["ingest"] = json.loads(proc.stdout.readline())
        # the queries must have run while the ingest did
        out["ingest_outlasted_queries"] = out["ingest"]["ended"] >= queries_ended
    finally:
        if proc.poll() is None and "ingest" not in out:
            proc.kill()  # something failed: the ingest is not waited for
        proc.wait(INGEST_SECONDS + 60)
    return out


def scenario_scale(run: Run, sizes: Sizes) -> None:
    """Pollen alone at ``scale_tasks``: Redis filled through the write path (decoder + writer,
    no broker), then bytes per task, API memory and query latency at that size; then the
    listings quiet and under full-speed ingest, with 1 shard and again with 3."""
    tasks = sizes.scale_tasks
    with scratch() as wd:
        server = RedisServer(wd / "redis").start()
        try:
            fill = micro.run(tasks, True, wd, server=server)
            row: dict[str, Any] = {
                "tasks": tasks,
                "fill": fill,
                "bytes_per_task": fill["redis_bytes_per_task"],
            }
            run.put("scale", row)  # the fill alone is worth keeping if the API fails
            env = {
                "POLLEN_REDIS_URL": server.url,
                "POLLEN_NAMESPACE": micro.NAMESPACE,
                "POLLEN_LOG_LEVEL": "WARNING",
            }
            client = redis.Redis(port=server.port)
            index = Keys(micro.NAMESPACE).all_shards[0].by_timestamp
            uuids = [u.decode() for u in raw_list(client.zrandmember(index, 50) or [])]
            proc, base = api_process(env, wd, 0)
            try:
                row["api_rss_start"] = rss([proc.pid])
                row["queries"] = http.time_paths(
                    base, query_paths(uuids, tasks), sizes.query_repeats
                )
                row["api_rss_after_queries"] = rss([proc.pid])
                exc = exception_class(EXCEPTION)
                beyond = {k: [p.format(exc=exc)] for k, p in BEYOND_FLOWER.items()}
                row["beyond_flower"] = http.time_paths(base, beyond, sizes.query_repeats)
                row["listings"] = {"1": _listings(base, server.url, 1, sizes.query_repeats)}
            finally:
                proc.stop()
                failed = any(set(q["status"]) != {"200"} for q in row.get("queries", {}).values())
                if failed or "queries" not in row:
                    row["api_log_tail"] = proc.output()[-4000:]
                run.put("scale", row)
            # the same size spread over 3 shards (slot-local, as on a Redis Cluster)
            client.flushall()
            fill3 = micro.run(tasks, True, wd, {"POLLEN_SHARDS": "3"}, server=server)
            row["fill_3_shards"] = {k: v for k, v in fill3.items() if k != "memory_breakdown"}
            proc, base = api_process({**env, "POLLEN_SHARDS": "3"}, wd, 1)
            try:
                row["listings"]["3"] = _listings(base, server.url, 3, sizes.query_repeats)
            finally:
                proc.stop()
                run.put("scale", row)
            client.close()
            _log({k: v for k, v in row.items() if k not in ("queries", "fill", "listings")})
        finally:
            server.stop()
    _api_queries(run, min(tasks, 100_000))


def _api_queries(run: Run, tasks: int) -> None:
    """The API engineer's own query benchmark (bench/api_queries.py), folded in when present."""
    script = ROOT / "bench" / "api_queries.py"
    if not script.exists():
        return
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.api_queries", "--tasks", str(tasks)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        # SIGINT, so its finally blocks stop the servers it started
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    returncode = proc.returncode
    found = [p for p in sorted(OUT.glob("api_queries*.json")) if p.stat().st_mtime >= started - 1]
    results = [json.loads(p.read_text()) for p in found]
    run.put(
        "api_queries",
        {
            "tasks": tasks,
            "returncode": returncode,
            "stderr_tail": (stderr or "")[-2000:],
            "files": [str(p.relative_to(ROOT)) for p in found],
            "results": results,
        },
    )


def scenario_push(run: Run, sizes: Sizes) -> None:
    """WebSocket fan-out: N clients of /api/events while events flow at a fixed rate
    (Pollen only: Flower 2 has no event push)."""
    kind = "redis"
    for clients, rate in sizes.ws_runs:
        with scratch() as wd, broker(kind, wd) as b:
            pollen = Pollen(b.url, wd / "pollen", 1)
            try:
                b.wait_consumers(1)
                base = pollen.start_api(1)[0]
                url = base.replace("http://", "ws://") + "/api/events"
                tasks = max(100, int(rate * sizes.ws_seconds / events_per_task()))
                config = GenConfig(broker=b.url, tasks=tasks, rate=float(rate), tag="ws")
                sent: list[GenResult] = []
                expected = int(tasks * events_per_task() * clients)
                sample = max(1, expected // 200_000)
                api_cpu = cpu_seconds(pollen.api_pids())
                t0 = time.monotonic()
                # clients in 2 processes of their own, so they do not starve the generator
                fanout = http.ws_fanout(
                    url,
                    clients,
                    2,
                    sample,
                    lambda c=config, out=sent: out.append(generate(c)),
                )
                api_busy = (cpu_seconds(pollen.api_pids()) - api_cpu) / (time.monotonic() - t0)
                api_rss = rss(pollen.api_pids())
            finally:
                pollen.stop()
        gen = sent[0]
        row = {
            "clients": clients,
            "rate": rate,
            "offered_rate": gen.events / gen.seconds if gen.seconds else 0.0,
            "events": gen.events,
            "expected_messages": gen.events * clients,
            **fanout,
            "api_rss": api_rss,
            "api_cpu_share": api_busy,
        }
        run.add("push", row)
        _log(row)


def scenario_profile(run: Run, sizes: Sizes) -> None:
    """py-spy on the collector (draining a backlog) and on the API (listing tasks)."""
    from bench import spy

    if "rabbitmq" not in brokers():
        return
    run.put("profiles", spy.run(sizes.backlog_tasks))


RUNNERS: dict[str, Callable[[Run, Sizes], None]] = {
    "micro": scenario_micro,
    "ingest": scenario_ingest,
    "sustained": scenario_sustained,
    "backlog": scenario_backlog,
    "memory": scenario_memory,
    "scale": scenario_scale,
    "push": scenario_push,
    "profile": scenario_profile,
}


#: The result keys each scenario writes (others write their own name).
SCENARIO_KEYS = {
    "micro": ("micro", "flower_state", "lua_profile"),
    "scale": ("scale", "api_queries"),
    "profile": ("profiles",),
}


def _log(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=str)[:400], flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--repeats", type=int, help="override the number of repeats")
    p.add_argument("--out", type=Path, default=OUT / "results.json")
    p.add_argument("--report-only", action="store_true", help="re-render from --out")
    p.add_argument(
        "--resume", action="store_true", help="continue --out: skip the scenarios it has"
    )
    p.add_argument("--redo", default="", help="with --resume: scenarios to run again anyway")
    a = p.parse_args(argv)
    from bench import report

    if a.report_only:
        report.render(json.loads(a.out.read_text()))
        return
    sizes = QUICK if a.quick else FULL
    if a.repeats:
        sizes = replace(sizes, repeats=a.repeats)
    run = Run(a.out, sizes, "quick" if a.quick else "full", argv)
    done: set[str] = set()
    if a.resume and a.out.exists():
        previous = json.loads(a.out.read_text())
        failed = {e["scenario"].split()[0] for e in previous.get("errors", [])}
        done = set(previous["meta"].get("scenario_seconds", {})) - failed - set(a.redo.split(","))
        previous["errors"] = [
            e for e in previous.get("errors", []) if e["scenario"].split()[0] not in failed
        ]
        previous["meta"]["argv"] += " ; then " + run.doc["meta"]["argv"]
        previous["meta"]["date_resumed"] = run.doc["meta"]["date"]
        previous["meta"]["commit_resumed"] = run.doc["meta"]["commit"]
        previous["meta"]["sizes"] = run.doc["meta"]["sizes"]
        run.doc = previous
    for name in a.only.split(","):
        if name in done:
            continue
        for key in SCENARIO_KEYS.get(name, (name,)):
            run.doc.pop(key, None)  # rows of an interrupted attempt
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            RUNNERS[name](run, sizes)
        except Exception as exc:  # one failed scenario must not lose the others
            traceback.print_exc()
            run.add("errors", {"scenario": name, "error": repr(exc)})
        run.doc["meta"].setdefault("scenario_seconds", {})[name] = time.monotonic() - started
        run.doc["meta"]["load_at_end"] = os.getloadavg()
        run.save()
    if a.out == OUT / "results.json":  # a side run (--out elsewhere) leaves BENCHMARKS.md alone
        report.render(run.doc)
