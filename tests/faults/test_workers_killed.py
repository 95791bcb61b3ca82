"""Workers killed with SIGKILL send no worker-offline: Pollen shows them offline by celery's
rule (no heartbeat for 2 x freq) and their unfinished tasks keep their last known state."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from shared.keys import Keys
from tests.support.api import Api
from tests.support.servers import RedisServer, celery_worker, pollen_env, service, wait_for

FREQ = 1.0
KILLED, KEPT = "wk@faults", "wa@faults"


def task_states(api: Api, uuids: list[str]) -> dict[str, tuple[str, Any]]:
    out = {}
    for uuid in uuids:
        status, _, body = api.get(f"/api/task/info/{uuid}")
        assert status == 200, (uuid, status, body[:200])
        task = json.loads(body)
        out[uuid] = (task["state"], task["worker"])
    return out


def beat_sent(r: redis.Redis, keys: Keys, hostname: str) -> float:
    """The sender time of the newest heartbeat applied for ``hostname`` (0 before any)."""
    raw = r.hget(keys.all_shards[0].worker(hostname), "_hbts")
    return float(raw) if raw is not None else 0.0


def test_sigkilled_worker_offline_within_two_heartbeats_tasks_keep_state(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    broker, state_url = server.url, f"redis://127.0.0.1:{server.port}/1"
    keys = Keys("killed")
    r = redis.Redis.from_url(state_url)
    collector = service(
        "collector", pollen_env(broker, state_url, "killed"), tmp_path / "collector.log"
    )
    beat = ("--heartbeat-interval", str(int(FREQ)))
    killed = celery_worker(broker, tmp_path / "killed.log", KILLED, *beat, "-Q", "killq")
    kept = celery_worker(broker, tmp_path / "kept.log", KEPT, *beat)
    api: Api | None = None
    app = Celery("killed-client", broker=broker)
    try:
        api = Api(pollen_env(broker, state_url, "killed"), tmp_path / "api.log")
        wait_for(
            lambda: api.json("/api/workers?status=1") == [(KEPT, True), (KILLED, True)],
            timeout=60,
            message="both workers alive",
        )
        done = [app.send_task("demo.app.add", (i, i), queue="killq").id for i in range(3)]
        wait_for(
            lambda: {s for s, _ in task_states(api, done).values()} == {"SUCCESS"},
            timeout=30,
            message="three tasks done",
        )
        # four run (threads pool of 4), the rest wait in the worker's prefetch buffer
        slow = [app.send_task("demo.app.slow", (120,), queue="killq").id for _ in range(6)]

        def running() -> bool:
            states = sorted(s for s, _ in task_states(api, slow).values())
            return states == ["RECEIVED"] * 2 + ["STARTED"] * 4

        wait_for(running, timeout=30, message="4 tasks started and 2 received")
        before = task_states(api, done + slow)

        def kept_alive() -> bool:
            return dict(api.json("/api/workers?status=1")) == {KILLED: False, KEPT: True}

        killed.kill()
        killed_at = time.time()
        # a heartbeat in flight at the kill has landed once a beat the kept worker sent a
        # full period after the kill is applied: both go through the same broker and the
        # same collector subscription, in the order the broker got them
        wait_for(
            lambda: beat_sent(r, keys, KEPT) > killed_at + FREQ,
            timeout=60,
            message="a heartbeat of the kept worker sent after the kill",
        )
        workers = dict(api.json("/api/workers"))
        dead = dict(workers[KILLED])
        assert dead["freq"] == FREQ
        last = float(dead["last_heartbeat"])
        # nothing came after the kill (by sender time: a beat sent before it may be received
        # after it, later still on a loaded machine)
        sent = beat_sent(r, keys, KILLED)
        assert 0 < sent <= killed_at, (sent, killed_at)
        # celery's rule, at the first moment it gives "offline": 2 x freq after the last beat.
        # The bound is the contract and cannot be missed by a late scheduler: the API judges at
        # the time it answers, which is after this wake-up, however late that comes
        time.sleep(max(0.0, last + 2 * FREQ + 0.05 - time.time()))
        status = dict(api.json("/api/workers?status=1"))
        assert status.get(KILLED) is False and set(status) == {KILLED, KEPT}, (
            status,
            last,
            time.time(),
        )
        # the kept worker is alive by the same rule, on its own beats, which a loaded machine
        # can delay past 2 x freq for a moment: polled, not read once
        wait_for(kept_alive, timeout=60, message=f"{KEPT} alive and {KILLED} offline")

        # the unfinished tasks keep their last known state (and worker), and stay listed so
        after = task_states(api, done + slow)
        assert after == before
        assert {w for _, w in after.values()} == {KILLED}
        started = dict(api.json(f"/api/tasks?state=STARTED&workername={KILLED}"))
        assert sorted(started) == sorted(u for u in slow if before[u][0] == "STARTED")
        # a fixed wait, to prove an absence: nothing changes later (no state is invented for
        # the unfinished tasks, no offline event). Nothing here can fail merely because the
        # machine is slow
        time.sleep(2 * FREQ)
        assert task_states(api, done + slow) == before
        assert dict(api.json("/api/workers?status=1")).get(KILLED) is False
        wait_for(kept_alive, timeout=60, message=f"{KEPT} alive and {KILLED} offline")
        assert r.hget(keys.all_shards[0].worker(KILLED), "_offts") is None  # no offline event
    finally:
        app.close()
        kept.stop()
        killed.stop()
        collector.stop()
        if api is not None:
            api.stop()
        server.stop()
    assert "Traceback" not in collector.output()
