"""Outages of Redis and of the broker during a stream: the collector waits them out and
loses nothing (RabbitMQ redelivers what was not acknowledged)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import redis

from shared.keys import Keys
from tests.streams import publish_tasks
from tests.support import RedisServer, pollen_env, rabbitmqctl, service, wait_for


def applied(r: redis.Redis, keys: Keys) -> int:
    return sum(int(v) for shard in keys.all_shards for v in r.hvals(shard.counts))


def test_redis_killed_and_restarted_mid_stream(amqp_url: str, tmp_path: Path) -> None:
    # appendfsync always: what Redis acknowledged survives kill -9, so an exact count is fair
    state = RedisServer(
        tmp_path / "state", None, "--appendonly", "yes", "--appendfsync", "always"
    ).start()
    redis_url = f"redis://127.0.0.1:{state.port}/0"
    keys = Keys("outage")
    env = pollen_env(amqp_url, redis_url, "outage", event_queue="pollen-outage", batch_size="100")
    collector = service("collector", env, tmp_path / "collector.log")
    tasks = 3000
    try:
        r = redis.Redis.from_url(redis_url)
        wait_for(lambda: r.zcard(keys.collectors), timeout=20, message="collector up")
        sender = threading.Thread(
            target=publish_tasks, args=(amqp_url, tasks), kwargs={"per_second": 1500.0}
        )
        sender.start()
        wait_for(lambda: applied(r, keys) > 1000, timeout=30, message="events flowing")
        state.kill()
        time.sleep(2.0)  # the stream goes on into RabbitMQ meanwhile
        assert collector.alive()
        state.start()
        sender.join(60)
        r = redis.Redis.from_url(redis_url)
        wait_for(lambda: applied(r, keys) >= tasks * 3, timeout=60, message="all applied")
        time.sleep(1.0)
        assert applied(r, keys) == tasks * 3
        assert r.zcard(keys.all_shards[0].by_state("SUCCESS")) == tasks
    finally:
        collector.stop()
        state.stop()
    log = collector.output()
    assert log.count("redis unavailable") == 1, log  # one line per outage, no crash loop
    assert "redis is back" in log
    assert "Traceback" not in log


def test_rabbitmq_connection_dropped_mid_stream(amqp_url: str, tmp_path: Path) -> None:
    """Closing every broker connection (as a RabbitMQ restart does) makes the collector
    reconnect by itself; the named queue kept the events meanwhile."""
    state = RedisServer(tmp_path / "state").start()
    redis_url = f"redis://127.0.0.1:{state.port}/0"
    keys = Keys("outage")
    env = pollen_env(amqp_url, redis_url, "outage", event_queue="pollen-outage-2", batch_size="100")
    collector = service("collector", env, tmp_path / "collector.log")
    tasks = 3000
    vhost = amqp_url.rsplit("/", 1)[1]
    try:
        r = redis.Redis.from_url(redis_url)
        wait_for(lambda: r.zcard(keys.collectors), timeout=20, message="collector up")
        sender = threading.Thread(
            target=publish_tasks, args=(amqp_url, tasks), kwargs={"per_second": 1500.0}
        )
        sender.start()
        wait_for(lambda: applied(r, keys) > 1000, timeout=30, message="events flowing")
        listing = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
        pids = [
            line.split("\t")[0]
            for line in listing.stdout.splitlines()
            if f"\t{vhost}\t" in line and "pollen-collector" in line
        ]
        assert pids, listing.stdout
        for pid in pids:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "test: broker restart"],
                capture_output=True,
                timeout=30,
            )
        sender.join(60)
        wait_for(lambda: applied(r, keys) >= tasks * 3, timeout=60, message="all applied")
        time.sleep(1.0)
        assert applied(r, keys) == tasks * 3
    finally:
        collector.stop()
        state.stop()
    log = collector.output()
    assert "broker unavailable" in log
    assert "Traceback" not in log
