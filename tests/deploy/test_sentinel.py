"""Redis Sentinel for the broker and for Pollen's own Redis, with a failover during capture:
the master is killed (SIGKILL), the sentinel promotes the replica, and the worker, the
collector, the enabler and the API all follow it to the new master."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.deploy import checks
from tests.deploy.conftest import Deployment, Sentinel, write_project
from tests.support import RedisServer, wait_for


def test_sentinel_broker_and_state_through_a_failover(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master").start()
    replica = RedisServer(
        tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(master.port)
    ).start()
    sentinel = Sentinel(tmp_path / "sentinel", master).start()
    project = tmp_path / "project"
    write_project(
        project,
        "acme_sentinel",
        f"""
        app.conf.broker_url = "sentinel://127.0.0.1:{sentinel.port}/0"
        app.conf.broker_transport_options = {{"master_name": {sentinel.name!r}}}
        """,
    )
    d = Deployment(
        project,
        "acme_sentinel",
        {
            "POLLEN_REDIS_URL": f"redis+sentinel://127.0.0.1:{sentinel.port}/{sentinel.name}/1",
            "POLLEN_NAMESPACE": "sentinel",
            "POLLEN_ENABLE_INTERVAL": "1",
            "POLLEN_INSPECT_INTERVAL": "2",
            "POLLEN_QUEUE_INTERVAL": "1",
            "POLLEN_QUEUES": "backlog",
            "POLLEN_INSPECT_TIMEOUT": "5",
        },
    )
    try:
        d.start()
        app = d.app()
        uptime = checks.worker_inspected(d)
        before = checks.tasks_seen(d, app, 5, tag=1)
        checks.backlog_measured(d, app, "backlog", 2)
        # what Pollen wrote so far is on the replica before the master goes
        replica_client = redis.Redis(port=replica.port, db=1)
        master_client = redis.Redis(port=master.port)
        assert master_client.wait(1, 10_000) == 1, "the replica did not catch up"
        master_client.close()
        master.kill()
        killed = time.monotonic()
        wait_for(
            lambda: sentinel.master_port() == replica.port,
            timeout=60,
            message="the sentinel to promote the replica",
        )
        promoted = time.monotonic() - killed
        # everything after the failover reaches the new master and is seen: events, inspect
        # answers, queue lengths, publishing and control from the API
        checks.worker_inspected(d, after=uptime)
        checks.tasks_seen(d, app, 5, tag=2)
        checks.backlog_measured(d, app, "backlog", 2)
        checks.control_works(d, "extra")
        # and nothing from before it was lost: it had been replicated
        found = d.get(f"/api/tasks?taskname={d.module}.add&state=SUCCESS&limit=1000")
        assert before <= set(found), before - set(found)
        assert replica_client.role()[0] == b"master", f"promoted in {promoted:.1f} s"
        replica_client.close()
        checks.no_tracebacks(d)
    finally:
        d.stop()
        sentinel.stop()
        replica.stop()
        master.stop()
