"""Lost tasks (#15) on a real cluster: a worker is SIGKILLed with tasks running and prefetched.

Real parts: RabbitMQ (a fresh vhost, which redelivers a dead consumer's unacknowledged
messages at once), a private redis-server, the collector, the enabler, two API replicas and
real ``celery worker`` processes. Every task is reported lost on both replicas (API, worker
counts, ``/metrics``, WebSocket) once the worker's heartbeats expire; the prefetched ones,
redelivered to another worker, finish there and are lost no more; the running ones (acked
when they started) stay lost. A worker restarted under its hostname before its heartbeats
expire loses its old tasks by its worker-online.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from shared.keys import HIDDEN, Keys
from shared.workers import deaths
from tests.support.api import Api
from tests.support.clients import WsReader
from tests.support.cluster import client, stop_all, wait_worker_up
from tests.support.servers import Process, celery_worker, pollen_env, service, wait_for

NAMESPACE = "lost"
KEYS = Keys(NAMESPACE)
DOOMED, RESCUER, PHOENIX = "doomed@lost", "rescuer@lost", "phoenix@lost"
#: celery's default event heartbeat interval: heartbeats expire 2 x 2 s after the last one
FREQ = 2.0


def worker_hash(**times: float) -> dict[bytes, bytes]:
    fields = {"hb": HIDDEN.heartbeat, "hbts": HIDDEN.heartbeat_ts, "offts": HIDDEN.offline_ts,
              "onts": HIDDEN.online_ts}  # fmt: skip
    out = {fields[k].encode(): repr(v).encode() for k, v in times.items()}
    out[b"freq"] = b"2.0"
    return out


def test_deaths_by_celerys_rule_confirmed_by_inspect() -> None:
    beating = worker_hash(hb=100.05, hbts=100.0, onts=90.0)
    # alive: only the worker-online's (the end of the incarnation before)
    assert deaths(beating, None, None, now=103.0) == [90.0]
    # heartbeats expired (the newest, 100.05, + 2 x 2 s): its last word, by its clock; a task
    # event counts as a heartbeat (celery), so one at 101.5 is the last word, at 105.5
    assert deaths(beating, 101.5, None, now=105.0) == [90.0]
    assert deaths(beating, 101.5, None, now=105.6) == [90.0, 101.5]
    assert deaths(beating, None, None, now=104.1) == [90.0, 100.0]
    # an inspect answer counts as a heartbeat: alive 2 x 2 s after it
    assert deaths(beating, None, 102.1, now=106.0) == [90.0]
    assert deaths(beating, None, 101.9, now=106.0) == [90.0, 100.0]
    # worker-offline as its last word: dead at once, at that time
    offline = worker_hash(hbts=100.0, offts=100.5, onts=90.0)
    assert deaths(offline, None, None, now=100.6) == [90.0, 100.5]
    assert deaths(worker_hash(), None, None, now=1.0) == []


def by_uuid(api: Api, query: str) -> dict[str, Any]:
    tasks: dict[str, Any] = api.data(f"/api/tasks?limit=1000&{query}")
    return tasks


def lost_count(api: Api, host: str) -> int:
    rows = {w["hostname"]: w for w in api.data("/api/stats/workers")["workers"]}
    return int(rows[host]["lost"]) if host in rows else 0


def lost_series(api: Api) -> dict[str, float]:
    """``pollen_tasks_lost`` by worker (task demo.app.hang_on)."""
    out = {}
    for line in api.get("/metrics")[2].decode().splitlines():
        if line.startswith("pollen_tasks_lost{") and 'task="demo.app.hang_on"' in line:
            out[line.split('worker="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def on_every(apis: list[Api], check: Callable[[Api], bool]) -> bool:
    return all(check(api) for api in apis)


def test_a_killed_workers_tasks_are_lost_and_found(
    amqp_url: str, state_url: str, state: redis.Redis, logs: Path
) -> None:
    env = pollen_env(amqp_url, state_url, NAMESPACE, enable_interval="1", inspect_interval="2")
    processes: list[Process | None] = []
    apis: list[Api] = []
    readers: list[WsReader] = []
    app: Celery = client(amqp_url)
    try:
        processes.append(service("collector", env, logs / "collector.log"))
        processes.append(service("enabler", env, logs / "enabler.log"))
        apis = [Api(env, logs / f"api{i}.log") for i in range(2)]
        doomed = celery_worker(amqp_url, logs / "doomed.log", DOOMED, concurrency=2)
        processes.append(doomed)
        wait_worker_up(amqp_url, DOOMED)
        for api in apis:
            reader = WsReader(api.url.replace("http", "ws") + "/api/events?type=task-lost", 600)
            reader.start()
            assert reader.connected.wait(10)
            readers.append(reader)

        # two run (acked as they start), three wait prefetched (unacked)
        sent = [app.send_task("demo.app.hang_on", (DOOMED,)).id for _ in range(5)]
        wait_for(
            lambda: (
                sorted(t["state"] for t in by_uuid(apis[0], f"workername={DOOMED}").values())
                == ["RECEIVED"] * 3 + ["STARTED"] * 2
            ),
            timeout=60,
            message="2 started and 3 prefetched on the doomed worker",
        )
        running = {u for u, t in by_uuid(apis[0], "state=STARTED").items()}
        assert not by_uuid(apis[0], "lost=1")
        doomed.kill()
        killed_at = time.time()

        wait_for(
            lambda: on_every(apis, lambda api: set(by_uuid(api, "lost=1")) == set(sent)),
            timeout=60,
            message="every task of the killed worker lost, on both replicas",
        )
        detected = time.time() - killed_at
        for api in apis:
            for uuid, task in by_uuid(api, "lost=1").items():
                assert task["lost"] is True and task["worker"] == DOOMED, task
                assert task["state"] == ("STARTED" if uuid in running else "RECEIVED")
                # lost at the worker's last word: not before the task's own events
                assert task["lost_at"] >= (task["started"] or task["received"])
            assert lost_count(api, DOOMED) == 5
            assert lost_series(api) == {DOOMED: 5.0}
            info = api.data(f"/api/task/info/{sent[0]}")
            assert info["lost"] is True and info["lost_at"] > 0
        print(f"lost reported {detected:.2f} s after the SIGKILL (2 x heartbeat = {2 * FREQ} s)")

        # RabbitMQ redelivers the prefetched three to the next consumer, which finishes them
        rescuer = celery_worker(amqp_url, logs / "rescuer.log", RESCUER, concurrency=2)
        processes.append(rescuer)
        waiting = set(sent) - running
        wait_for(
            lambda: on_every(apis, lambda api: set(by_uuid(api, "lost=1")) == running),
            timeout=60,
            message="the redelivered tasks lost no more",
        )
        wait_for(
            lambda: {u for u, t in by_uuid(apis[1], "state=SUCCESS").items()} == waiting,
            timeout=60,
            message="the redelivered tasks done",
        )
        for api in apis:
            done = by_uuid(api, "state=SUCCESS")
            assert all("lost" not in t and t["worker"] == RESCUER for t in done.values()), done
            assert lost_count(api, DOOMED) == 2 and lost_series(api) == {DOOMED: 2.0}

        # a worker restarted under its name before its heartbeats expire (a container restart)
        slow_beats = ("--heartbeat-interval", "60", "--queues", "phoenix")
        phoenix = celery_worker(amqp_url, logs / "phoenix.log", PHOENIX, *slow_beats)
        processes.append(phoenix)
        wait_worker_up(amqp_url, PHOENIX)
        burnt = app.send_task("demo.app.hang_on", (PHOENIX,), queue="phoenix").id
        wait_for(
            lambda: (
                by_uuid(apis[0], f"workername={PHOENIX}").get(burnt, {}).get("state") == "STARTED"
            ),
            timeout=60,
            message="a task started on the phoenix",
        )
        phoenix.kill()
        reborn = celery_worker(amqp_url, logs / "reborn.log", PHOENIX, *slow_beats)
        processes.append(reborn)
        wait_worker_up(amqp_url, PHOENIX)
        wait_for(
            lambda: on_every(apis, lambda api: set(by_uuid(api, "lost=1")) == running | {burnt}),
            timeout=30,
            message="the phoenix's old task lost by its new worker-online",
        )
        rows = {w["hostname"]: w for w in apis[0].data("/api/stats/workers")["workers"]}
        assert rows[PHOENIX]["alive"], rows[PHOENIX]

        # the WebSocket told both replicas' clients every change, in order per task
        expected = {u: [True] for u in running | {burnt}} | {u: [True, False] for u in waiting}

        def announced(reader: WsReader) -> dict[str, list[bool]]:
            out: dict[str, list[bool]] = {}
            for m in reader.messages:
                if m.get("type") == "task-lost":
                    out.setdefault(m["uuid"], []).append(m["lost"])
            return out

        wait_for(
            lambda: all(announced(r) == expected for r in readers),
            timeout=30,
            message="task-lost pushed to both replicas' clients",
        )
    finally:
        for reader in readers:
            reader.stop_flag.set()
        app.close()
        for api in apis:
            api.stop()
        stop_all(*processes)
