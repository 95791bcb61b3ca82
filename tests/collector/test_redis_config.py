"""The Redis settings Pollen's data is sized for (``shared.connections.RECOMMENDED_CONFIG``):
why they matter, on a real Redis, and the collector saying so when a server has Redis's
defaults."""

from __future__ import annotations

from pathlib import Path

import redis

from services.collector.writer import Writer
from shared.connections import RECOMMENDED_CONFIG, config_advice
from shared.settings import load
from tests.support import readback
from tests.support.servers import RedisServer, pollen_env, service, wait_for

LISTPACK_VALUE = "hash-max-ziplist-value"  # hash-max-listpack-value since Redis 7
#: a traceback of the length real ones have (a few frames)
TRACEBACK = "Traceback (most recent call last):\n" + '  File "x.py", line 1, in f\n' * 30


def _failed_task(client: redis.Redis, namespace: str) -> str:
    """A task-received and a task-failed with a long traceback through the write path; returns
    the encoding of the task's hash."""
    writer = Writer(client, load({"POLLEN_NAMESPACE": namespace}))
    common = {"uuid": "t1", "hostname": "w1"}
    readback.apply(
        writer,
        [
            {"type": "task-received", "timestamp": 1.0, "clock": 1, "name": "f", **common},
            {
                "type": "task-failed",
                "timestamp": 2.0,
                "clock": 2,
                "exception": "ValueError('x')",
                "traceback": TRACEBACK,
                **common,
            },
        ],
    )
    encoding = client.object("encoding", writer.keys.all_shards[0].task("t1"))
    assert isinstance(encoding, bytes)
    return encoding.decode()


def test_a_failed_task_stays_compact_with_the_recommended_config(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis(port=server.port)
    try:
        assert config_advice(client) == []
        assert _failed_task(client, "tuned") == "listpack"
        # Redis's default: the traceback alone turns the hash into a hashtable
        client.config_set(LISTPACK_VALUE, 64)
        assert _failed_task(client, "default") == "hashtable"
        assert config_advice(client) == [
            f"{LISTPACK_VALUE} is 64; Pollen is sized for {RECOMMENDED_CONFIG[LISTPACK_VALUE]}"
        ]
    finally:
        client.close()
        server.stop()


def test_the_collector_names_a_setting_below_the_recommended(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", None, "--" + LISTPACK_VALUE, "64").start()
    broker = RedisServer(tmp_path / "broker").start()
    env = pollen_env(f"redis://127.0.0.1:{broker.port}/0", server.url)
    collector = service("collector", env, tmp_path / "collector.log")
    try:
        wait_for(
            lambda: f"{LISTPACK_VALUE} is 64" in collector.output(),
            timeout=30,
            message="the collector's advice on the Redis config",
        )
        assert "docs/operations.md" in collector.output()
    finally:
        collector.stop()
        server.stop()
        broker.stop()
