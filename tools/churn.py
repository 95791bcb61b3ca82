"""``make churn``: 200 real Celery workers come and go; Pollen ends with the live ones only.

A Redis of its own (broker db 0, Pollen db 1), the collector, the enabler (with
``POLLEN_OFFLINE_WORKER_TTL=--ttl``) and an API process. Real ``celery -A demo.app worker``
processes (threads pool, one thread) start in waves of ``--wave``; each runs a few tasks, then
a third of the wave stops cleanly (worker-offline), a third is SIGKILLed with a task running
(silence: its heartbeats expire, its task is lost), a third stays to the end. Each wave after
the first also restarts a few of the previous wave's stopped workers under their names.
It passes when

- every reader (``/api/stats/workers``, ``/api/workers``, ``/metrics`` series) ends with exactly
  the live workers, and no worker was forgotten before ``--ttl`` seconds offline or kept long
  after (each one's offline moment is known: its stop, or its kill plus 2 heartbeats);
- every SIGKILLed worker's running task was reported lost, and stays listed by ``lost=1``;
- once the live ones stop too and are forgotten, no worker key is left and Redis's worker data
  (hashes, sets, counters, deaths, inspect answers) comes back to within 10 % of what the
  churn added (what stays is the slack of encodings that do not shrink back).

Usage: ``python -m tools.churn [--workers 200] [--wave 50] [--ttl 20] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from services.enabler.retention import interval as retention_interval
from shared.keys import Keys
from tests.support.servers import (
    Process,
    RedisServer,
    celery_worker,
    free_port,
    log_problems,
    pollen_env,
    service,
)

NAMESPACE = "churn"
KEYS = Keys(NAMESPACE)
#: celery's default event heartbeat interval: a silent worker is offline 2 x 2 s after its last.
FREQ = 2.0
#: Seconds between the watcher's polls of the readers (and the slack allowed for them).
ROUND = 1.0


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        body = resp.read()
    return body.decode() if path == "/metrics" else json.loads(body)


def shown(port: int) -> dict[str, set[str]]:
    """The workers each reader shows."""
    metrics = get(port, "/metrics")
    series = {
        line.split('worker="', 1)[1].split('"', 1)[0]
        for line in metrics.splitlines()
        if 'worker="' in line and not line.startswith("#")
    }
    return {
        "dashboard": {w["hostname"] for w in get(port, "/api/stats/workers")["workers"]},
        "api": set(get(port, "/api/workers?status=1")),
        "metrics": series,
    }


def worker_bytes(r: redis.Redis) -> int:
    """Bytes of every key holding worker data."""
    shard = KEYS.all_shards[0]
    keys = [shard.counts, shard.runtime, shard.workers, shard.seen, shard.deaths, KEYS.inspected]
    for pattern in (shard.worker("*"), shard.worker_dedup("*"), f"{NAMESPACE}:inspect:*"):
        keys += [k.decode() for k in r.scan_iter(match=pattern)]
    return sum(int(r.memory_usage(k) or 0) for k in keys)


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(what)


class Churn:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.server = RedisServer(work / "redis").start()
        self.broker = f"redis://127.0.0.1:{self.server.port}/0"
        self.state = redis.Redis(port=self.server.port, db=1)
        self.app = Celery("churn-client", broker=self.broker)
        self.port = free_port()
        env = pollen_env(
            self.broker,
            f"redis://127.0.0.1:{self.server.port}/1",
            NAMESPACE,
            offline_worker_ttl=str(args.ttl),
            enable_interval="2",
            inspect_interval="5",
        )
        self.services = [
            service("collector", env, work / "collector.log"),
            service("enabler", env, work / "enabler.log"),
            service(
                "api",
                {**env, "POLLEN_API_PORT": str(self.port), "POLLEN_API_HOST": "127.0.0.1"},
                work / "api.log",
            ),
        ]
        self.workers: dict[str, Process] = {}
        #: hostname -> when it went offline, at the earliest and at the latest: a stopped
        #: worker between its SIGTERM and its exit; a killed one when its heartbeats expire,
        #: 1 to 2 heartbeat intervals after the SIGKILL
        self.offline_at: dict[str, tuple[float, float]] = {}
        #: hostname -> when it left the readers, at the earliest (the start of the last poll
        #: that still showed it) and at the latest (the end of the first that did not)
        self.gone_at: dict[str, tuple[float, float]] = {}
        self.last_poll = time.time()
        self.lost: set[str] = set()
        self.started = 0
        self.done = threading.Event()
        self.watcher = threading.Thread(target=self._watch_loop, daemon=True)

    def _watch_loop(self) -> None:
        while not self.done.wait(ROUND / 2):
            try:
                self.watch()
            except OSError:
                continue

    def start(self, hosts: list[str]) -> None:
        for host in hosts:
            self.workers[host] = celery_worker(
                self.broker,
                self.work / f"{host}.log",
                host,
                "--queues",
                f"celery,q.{host}",
                pool="threads",
                concurrency=1,
            )
            self.offline_at.pop(host, None)
            self.gone_at.pop(host, None)
        self.started += len(hosts)

        def answering() -> bool:
            replies = self.app.control.ping(destination=hosts, timeout=1.0)
            return {h for reply in replies for h in reply} >= set(hosts)

        wait(answering, 300, f"{len(hosts)} workers answering pings", interval=1.0)

    def stop(self, hosts: list[str]) -> None:
        signalled = time.time()
        for host in hosts:
            self.workers[host].signal(15)
        for host in hosts:
            self.workers.pop(host).stop()
            self.offline_at[host] = (signalled, time.time())

    def kill(self, hosts: list[str]) -> None:
        """SIGKILL each with a task running on it (its own queue): that task is lost."""
        ids = {h: self.app.send_task("demo.app.hang_on", (h,), queue=f"q.{h}").id for h in hosts}

        def all_started() -> bool:
            for host, uuid in ids.items():
                info = get(self.port, f"/api/tasks?workername={host}&state=STARTED")
                if uuid not in info:
                    return False
            return True

        try:
            wait(all_started, 120, "a task running on each worker to kill")
        except TimeoutError:
            print(json.dumps(get(self.port, "/api/tasks?taskname=demo.app.hang_on"))[:3000])
            print(ids, time.time())
            raise
        for host in hosts:
            self.workers.pop(host).kill()
            self.offline_at[host] = (time.time() + FREQ, time.time() + 2 * FREQ + 1)
        self.lost |= set(ids.values())

    def watch(self) -> set[str]:
        """Note when each offline worker leaves the readers; the workers shown now."""
        start = time.time()
        seen = shown(self.port)
        end = time.time()
        everywhere = set().union(*seen.values())
        for host in list(self.offline_at):
            if host not in everywhere and host not in self.gone_at:
                self.gone_at[host] = (self.last_poll, end)
        self.last_poll = start
        return everywhere

    def run(self) -> dict[str, Any]:
        args = self.args
        wait(lambda: self.services[2].alive() and self._up(), 30, "the API")
        before = worker_bytes(self.state)
        self.watcher.start()
        names = [f"churn-{i:03d}@pod-{i % 23}" for i in range(args.workers)]
        waves = [names[i : i + args.wave] for i in range(0, len(names), args.wave)]
        kept: list[str] = []
        stopped_before: list[str] = []
        peak = before
        for n, wave in enumerate(waves):
            back = stopped_before[:3]
            t0 = time.time()
            self.start(wave + back)
            print(f"wave {n}: {len(wave)} new + {len(back)} back in {time.time() - t0:.0f} s")
            for _ in range(2 * len(wave)):
                self.app.send_task("demo.app.add", (1, 2))
            members = wave + back
            third = len(members) // 3
            to_stop, to_kill = members[:third], members[third : 2 * third]
            wait(
                lambda: self.watch() >= set(self.workers),
                120,
                "every running worker shown",
            )
            peak = max(peak, worker_bytes(self.state))
            self.stop(to_stop)
            self.kill(to_kill)
            kept += members[2 * third :]
            stopped_before = to_stop
            self.watch()
        live = set(self.workers)
        assert live == set(kept), (sorted(live ^ set(kept))[:5],)

        def settled() -> bool:
            self.watch()
            return all(v == live for v in shown(self.port).values())

        wait(settled, args.ttl + 120, "only the live workers on every reader", interval=1.0)
        # surely gone before the TTL, or surely kept longer than the TTL and two retention
        # rounds (a round's own work, and the enabler's lock shared with inspect, delay the next)
        rounds = retention_interval(args.ttl)
        early = {
            h: round(self.gone_at[h][1] - first, 1)
            for h, (first, _) in self.offline_at.items()
            if self.gone_at[h][1] - first < args.ttl
        }
        late = {
            h: round(self.gone_at[h][0] - last, 1)
            for h, (_, last) in self.offline_at.items()
            if self.gone_at[h][0] - last > args.ttl + 2 * rounds + 2 * ROUND
        }
        overshoot = max(
            (self.gone_at[h][0] - last - args.ttl for h, (_, last) in self.offline_at.items()),
            default=0.0,
        )
        forgotten = len(self.gone_at)
        listed = set(get(self.port, "/api/tasks?lost=1&limit=1000"))
        unlisted = [
            get(self.port, f"/api/task/info/{uuid}") for uuid in sorted(self.lost - listed)[:3]
        ]
        # then the rest go too: once forgotten, the worker data is back to where it started
        self.stop(sorted(self.workers))
        wait(
            lambda: not any(shown(self.port).values()),
            args.ttl + 120,
            "no worker left on any reader",
            interval=1.0,
        )
        after = worker_bytes(self.state)
        leftovers = sorted(
            k.decode()
            for pattern in (KEYS.all_shards[0].worker("*"), f"{NAMESPACE}:inspect:*")
            for k in self.state.scan_iter(match=pattern)
        )
        report = {
            "workers": len(names),
            "started": self.started,
            "live": len(live),
            "forgotten": forgotten,
            "forgotten_early": early,
            "forgotten_late": late,
            "most_kept_beyond_ttl_s": round(overshoot, 1),
            "lost_expected": len(self.lost),
            "lost_listed": len(listed & self.lost),
            "lost_unlisted": unlisted,
            "worker_bytes": {"before": before, "peak": peak, "after": after},
            "worker_keys_left": leftovers[:10],
            "problems": [
                line
                for f in ("collector.log", "enabler.log", "api.log")
                for line in log_problems((self.work / f).read_text(errors="replace"))
            ],
        }
        report["passed"] = (
            not early
            and not late
            and self.lost <= listed
            and not leftovers
            and after - before <= 0.1 * (peak - before)
            and not report["problems"]
        )
        return report

    def _up(self) -> bool:
        try:
            get(self.port, "/healthz")
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.done.set()
        for process in [*self.workers.values(), *self.services]:
            process.stop()
        self.app.close()
        self.state.close()
        self.server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--wave", type=int, default=50)
    parser.add_argument("--ttl", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--logs", type=Path, help="keep the logs in this directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pollen-churn-") as tmp:
        work = Path(tmp) if args.logs is None else args.logs
        work.mkdir(parents=True, exist_ok=True)
        churn = Churn(args, work)
        try:
            report = churn.run()
        finally:
            churn.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
