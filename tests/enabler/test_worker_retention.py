"""Worker retention (#15): a cluster where 200 workers come and go ends with exactly the live
workers plus those offline for less than ``POLLEN_OFFLINE_WORKER_TTL``, on the API, the
dashboard's data and ``/metrics``, and the worker data in Redis shrinks back to what it was
before the churn.

Real parts: a private redis-server (broker db 0, Pollen db 1), the collector, the enabler and
the API processes, three real ``celery worker`` processes (one kept, one stopped cleanly, one
SIGKILLed, then the stopped one restarted under its old name after it was forgotten), and 200
more workers' events sent through celery's own EventDispatcher (online, heartbeats, task
events, then offline for half of them and silence for the others).
"""

from __future__ import annotations

import time
import uuid as uuidlib
from pathlib import Path

import redis
from celery import Celery

from shared.keys import Keys
from shared.workers import to_purge
from tests.support.api import Api
from tests.support.cluster import client, stop_all, wait_worker_up
from tests.support.servers import Process, RedisServer, celery_worker, pollen_env, service, wait_for

NAMESPACE = "churn"
KEYS = Keys(NAMESPACE)
TTL = 8
CHURN = 200
#: Worker data: what retention must bring back to its size (tasks are kept on purpose).
WORKER_KEYS = ("counts", "runtime", "workers", "seen")


def test_to_purge_takes_the_ttl_then_the_cap_longest_offline_first() -> None:
    now = 1000.0
    offline = {"live": now + 5, "new": now - 1, "old": now - 50, "older": now - 90}
    assert to_purge(offline, now, ttl=40, most=10) == ["older", "old"]
    assert to_purge(offline, now, ttl=0, most=2) == ["older", "old"]
    assert to_purge(offline, now, ttl=40, most=1) == ["older", "old", "new"]  # never "live"
    assert to_purge(offline, now, ttl=100, most=10) == []


def churn(app: Celery, hosts: list[str], offline: bool) -> None:
    """Each host: online, two heartbeats and a task, as a worker sends them; then offline,
    or nothing more (its heartbeats expire)."""
    for host in hosts:
        with app.events.default_dispatcher(hostname=host) as d:
            d.send("worker-online", freq=1.0, active=0, processed=0)
            u = str(uuidlib.uuid4())
            d.send("task-received", uuid=u, name="churn.job", args="()", kwargs="{}", retries=0)
            d.send("worker-heartbeat", freq=1.0, active=1, processed=0)
            d.send("task-started", uuid=u)
            d.send("task-succeeded", uuid=u, result="1", runtime=0.01)
            d.send("worker-heartbeat", freq=1.0, active=0, processed=1)
            if offline:
                d.send("worker-offline", freq=1.0, active=0, processed=1)


def worker_memory(r: redis.Redis) -> int:
    return sum(worker_keys(r).values())


def worker_keys(r: redis.Redis) -> dict[str, int]:
    """Bytes of each key holding worker data."""
    shard = KEYS.all_shards[0]
    keys = [getattr(shard, name) for name in WORKER_KEYS]
    for pattern in (shard.worker("*"), shard.worker_dedup("*")):
        keys += [k.decode() for k in r.scan_iter(match=pattern)]
    keys += [KEYS.inspected] + [k.decode() for k in r.scan_iter(match=f"{NAMESPACE}:inspect:*")]
    return {k: int(r.memory_usage(k) or 0) for k in keys}


def shown(api: Api) -> dict[str, set[str]]:
    """The workers each reader shows: the API, the dashboard's data, /metrics."""
    metrics = api.get("/metrics")[2].decode()
    online = {
        line.split('worker="', 1)[1].split('"', 1)[0]
        for line in metrics.splitlines()
        if line.startswith("flower_worker_online{")
    }
    labelled = {
        line.split('worker="', 1)[1].split('"', 1)[0]
        for line in metrics.splitlines()
        if 'worker="' in line and not line.startswith("#")
    }
    return {
        "api": set(api.data("/api/workers?status=1")),
        "dashboard": {w["hostname"] for w in api.data("/api/stats/workers")["workers"]},
        "metrics": online,
        "metric series": labelled,
    }


def test_two_hundred_workers_come_and_go(server: RedisServer, tmp_path: Path) -> None:
    broker = f"redis://127.0.0.1:{server.port}/0"
    state = redis.Redis(port=server.port, db=1)
    state.flushall()
    env = pollen_env(
        broker,
        f"redis://127.0.0.1:{server.port}/1",
        NAMESPACE,
        offline_worker_ttl=str(TTL),
        enable_interval="1",
        inspect_interval="2",
    )
    processes: list[Process | None] = []
    api: Api | None = None
    app = client(broker)
    try:
        processes.append(service("collector", env, tmp_path / "collector.log"))
        processes.append(service("enabler", env, tmp_path / "enabler.log"))
        api = Api(env, tmp_path / "api.log")
        kept = celery_worker(broker, tmp_path / "kept.log", "kept@churn", pool="solo")
        processes.append(kept)
        wait_worker_up(broker, "kept@churn")
        wait_for(lambda: shown(api)["api"] == {"kept@churn"}, timeout=60, message="kept@churn")
        wait_for(
            lambda: state.exists(KEYS.inspect("kept@churn")), timeout=60, message="its inspect"
        )
        before = worker_memory(state)

        stopped = celery_worker(broker, tmp_path / "stopped.log", "stopped@churn", pool="solo")
        killed = celery_worker(broker, tmp_path / "killed.log", "killed@churn", pool="solo")
        processes += [stopped, killed]
        for name in ("stopped@churn", "killed@churn"):
            wait_worker_up(broker, name)
        hosts = [f"churn-{i}@pod-{i % 17}" for i in range(CHURN)]
        churn(app, hosts[: CHURN // 2], offline=True)
        churn(app, hosts[CHURN // 2 :], offline=False)
        wait_for(
            lambda: set(hosts) <= shown(api)["dashboard"], timeout=60, message="the churn seen"
        )
        peak = worker_memory(state)
        stopped.stop()  # worker-offline
        killed.kill()  # silence: offline when its heartbeats expire
        churned_at = time.time()

        # each offline worker goes once offline for TTL seconds (and one retention round);
        # until then it is still shown, after it nowhere
        everyone = {"kept@churn", "stopped@churn", "killed@churn", *hosts}
        present = shown(api)
        if time.time() - churned_at < TTL - 2:
            # within the TTL (read before it can have passed): all still there
            assert present["api"] == everyone, sorted(everyone - present["api"])[:5]
        wait_for(
            lambda: all(v == {"kept@churn"} for v in shown(api).values()),
            timeout=90,
            message="only the live worker left on every reader",
        )
        assert time.time() - churned_at >= TTL - 1, "forgotten before the TTL"
        gone = {k.decode() for k in state.scan_iter(match=KEYS.all_shards[0].worker("churn-*"))}
        assert not gone, sorted(gone)[:5]
        # tasks stay, with their worker
        tasks = api.data("/api/tasks?taskname=churn.job&limit=1000")
        assert len(tasks) == CHURN and {t["worker"] for t in tasks.values()} == set(hosts)
        # what the churn added is given back, but for the slack of Redis's encodings: a hash or
        # zset that outgrew its compact listpack stays a hashtable/skiplist when it shrinks
        after = worker_memory(state)
        biggest = sorted(worker_keys(state).items(), key=lambda kv: -kv[1])[:6]
        assert after - before <= 0.1 * (peak - before), (before, peak, biggest)

        # a forgotten worker that comes back is new: its counts start again
        back = celery_worker(broker, tmp_path / "back.log", "stopped@churn", pool="solo")
        processes.append(back)
        wait_worker_up(broker, "stopped@churn")
        wait_for(
            lambda: shown(api)["api"] == {"kept@churn", "stopped@churn"},
            timeout=60,
            message="stopped@churn back",
        )
        rows = {w["hostname"]: w for w in api.data("/api/stats/workers")["workers"]}
        assert rows["stopped@churn"]["events"].get("worker-online") == 1, rows["stopped@churn"]
    finally:
        app.close()
        if api is not None:
            api.stop()
        stop_all(*processes)
        state.close()
