"""Helpers shared by the enabler and control tests: real workers, real services, real brokers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis
from celery import Celery

from shared.keys import Keys
from tests.support.replies import raw_hash
from tests.support.servers import Process, pollen_env, service, wait_for

NAMESPACE = "ctl"
KEYS = Keys(NAMESPACE)


def client(broker_url: str, backend: str | None = None) -> Celery:
    app = Celery("test-client", broker=broker_url, backend=backend)
    app.conf.broker_connection_retry_on_startup = True
    return app


def enabler(
    broker_url: str, redis_url: str, log: Path, namespace: str = NAMESPACE, **settings: str
) -> Process:
    return service("enabler", pollen_env(broker_url, redis_url, namespace, **settings), log)


def collector(broker_url: str, redis_url: str, log: Path, namespace: str = NAMESPACE) -> Process:
    return service("collector", pollen_env(broker_url, redis_url, namespace), log)


def inspect_data(r: redis.Redis, keys: Keys, hostname: str) -> dict[str, Any]:
    """The enabler's stored answers of ``hostname``: ``{field: decoded JSON}``."""
    raw = raw_hash(r.hgetall(keys.inspect(hostname)))
    return {k.decode(): msgspec.json.decode(v) for k, v in raw.items()}


def lease_holder(r: redis.Redis, keys: Keys) -> str | None:
    raw = r.get(keys.enabler_lease)
    return raw.decode() if isinstance(raw, bytes) else None


def stop_all(*processes: Process | None) -> None:
    for process in processes:
        if process is not None:
            with contextlib.suppress(Exception):
                process.stop()


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[tuple[Process, ...]]:
    try:
        yield processes
    finally:
        stop_all(*processes)


def wait_worker_up(broker_url: str, hostname: str, timeout: float = 30.0) -> None:
    """Until the worker answers a ping (its control consumer is listening)."""
    app = client(broker_url)
    try:
        wait_for(
            lambda: app.control.ping(destination=[hostname], timeout=0.5),
            timeout=timeout,
            interval=0.2,
            message=f"{hostname} answering pings",
        )
    finally:
        app.close()


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def ensure_rabbitmq_management() -> str:
    """The local RabbitMQ's management API URL, enabling its plugin if it is off."""
    if not port_open(15672):
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        wait_for(
            lambda: port_open(15672),
            timeout=60,
            interval=0.5,
            message="the RabbitMQ management API listening",
        )
    return "http://guest:guest@127.0.0.1:15672/api/"
