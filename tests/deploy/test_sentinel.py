"""Redis Sentinel for the broker and for Pollen's own Redis, with a failover during capture:
the master is killed (SIGKILL), the sentinel promotes the replica, and the worker, the
collector, the enabler and the API all follow it to the new master."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.deploy import checks
from tests.deploy.conftest import Deployment, Sentinel, write_project
from tests.support.servers import RedisServer, free_port, wait_for


def test_sentinel_broker_and_state_through_a_failover(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master").start()
    # two replicas: after the failover one is left to confirm writes (WAIT 1)
    replica, spare = (
        RedisServer(tmp_path / name, None, "--replicaof", "127.0.0.1", str(master.port)).start()
        for name in ("replica", "spare")
    )
    sentinel = Sentinel(tmp_path / "sentinel", master, replicas=2).start()
    dead = free_port()  # nothing listens there
    project = tmp_path / "project"
    write_project(
        project,
        "acme_sentinel",
        f"""
        app.conf.broker_url = "sentinel://127.0.0.1:{dead}/0;sentinel://127.0.0.1:{sentinel.port}/0"
        app.conf.broker_transport_options = {{"master_name": {sentinel.name!r}}}
        """,
    )
    d = Deployment(
        project,
        "acme_sentinel",
        {
            # a list whose first sentinel is down, as when one of three is being replaced
            "POLLEN_REDIS_URL": f"redis+sentinel://127.0.0.1:{dead},127.0.0.1:{sentinel.port}"
            f"/{sentinel.name}/1",
            "POLLEN_NAMESPACE": "sentinel",
            "POLLEN_REDIS_WAIT_REPLICAS": "1",
            **checks.QUICK,
        },
    )
    try:
        d.start()
        app = d.app()
        checks.worker_inspected(d)
        before = checks.tasks_seen(d, app, 5, tag=1)
        checks.backlog_measured(d, app, "backlog", 2)
        # the collector has had every batch so far confirmed by the replica (WAIT 1)
        master.kill()
        killed_at, killed = time.time(), time.monotonic()
        wait_for(
            lambda: sentinel.master_port() in (replica.port, spare.port),
            timeout=60,
            message="the sentinel to promote a replica",
        )
        promoted = time.monotonic() - killed
        # everything after the failover reaches the new master and is seen: events, inspect
        # answers, queue lengths, publishing and control from the API
        checks.worker_inspected(d, since=killed_at)
        # events the worker publishes before the collector has subscribed again are lost on
        # the broker (pub/sub keeps nothing): tasks are sent once events flow
        checks.events_flow(d, since=killed_at)
        checks.tasks_seen(d, app, 5, tag=2)
        checks.backlog_measured(d, app, "backlog", 2)
        checks.control_works(d, "extra")
        # and nothing from before it was lost: the collector waited for the replica
        found = d.get(f"/api/tasks?taskname={d.module}.add&state=SUCCESS&limit=1000")
        assert before <= set(found), before - set(found)

        def promoted_is_master() -> bool:
            # the sentinel names a former replica, and that node says it is the master (the
            # sentinel may name it a moment before the node has switched its role)
            port = sentinel.master_port()
            node = redis.Redis(port=port)
            try:
                return port in (replica.port, spare.port) and node.role()[0] == b"master"
            finally:
                node.close()

        wait_for(promoted_is_master, message=f"the promoted replica as master ({promoted:.1f} s)")
        checks.no_tracebacks(d)
    finally:
        d.stop()
        sentinel.stop()
        replica.stop()
        spare.stop()
        master.stop()


def test_batches_wait_for_the_replica(amqp_url: str, tmp_path: Path) -> None:
    """With ``POLLEN_REDIS_WAIT_REPLICAS=1`` and no replica, the collector applies events but
    acknowledges none of them (RabbitMQ keeps them unacknowledged) and says why; once a
    replica attaches, the batches are confirmed, acknowledged and the queue drains."""
    import json

    from celery import Celery

    from shared.keys import Keys
    from tests.support.servers import pollen_env, rabbitmqctl, service

    master = RedisServer(tmp_path / "master").start()
    queue = "pollen-wait-test"
    env = pollen_env(
        amqp_url, f"redis://127.0.0.1:{master.port}/1", "waits",
        redis_wait_replicas="1", event_queue=queue,
    )  # fmt: skip
    collector = service("collector", env, tmp_path / "collector.log")
    vhost = amqp_url.rsplit("/", 1)[1]

    def queue_counts() -> tuple[int, int] | None:
        out = rabbitmqctl(
            "list_queues", "-p", vhost, "name", "messages_ready",
            "messages_unacknowledged", "--formatter", "json",
        )  # fmt: skip
        for row in json.loads(out.stdout or "[]"):
            if row["name"] == queue:
                return int(row["messages_ready"]), int(row["messages_unacknowledged"])
        return None

    app = Celery("wait-client", broker=amqp_url)
    replica = None
    try:
        wait_for(queue_counts, message="the collector's event queue")
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, hostname="w@wait", enabled=True)
            for i in range(5):
                dispatcher.send("task-received", uuid=f"t{i}", name="t.add", args="()")
            dispatcher.close()
        wait_for(
            lambda: "replicas confirmed a batch" in collector.output(),
            message="the collector to report the missing replica",
        )
        counts = queue_counts()
        assert counts is not None and counts[1] == 5, counts  # held, unacknowledged
        replica = RedisServer(
            tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(master.port)
        ).start()
        wait_for(lambda: queue_counts() == (0, 0), message="the batch confirmed and acked")
        replica_client = redis.Redis(port=replica.port, db=1)
        assert replica_client.exists(Keys("waits", 1).shard_for("t4").task("t4"))
        replica_client.close()
    finally:
        app.close()
        collector.stop()
        if replica is not None:
            replica.stop()
        master.stop()
