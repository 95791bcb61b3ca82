"""The control tests' stack: a private redis-server (broker db 0, Pollen db 1, results db 2),
a collector, an enabler and a prefork worker for the module; the API in-process per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from services.api.app import make_app
from shared.settings import Settings, load
from tests.support.cluster import (
    NAMESPACE,
    collector,
    enabler,
    inspect_data,
    stop_all,
    wait_worker_up,
)
from tests.support.servers import Process, RedisServer, celery_worker, wait_for


@dataclass
class Stack:
    server: RedisServer
    worker: Process
    hostname: str
    logs: Path

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/0"

    @property
    def state_url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/1"

    @property
    def backend_url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/2"

    def settings(self, **overrides: str) -> Settings:
        env = {
            "POLLEN_BROKER_URL": self.broker_url,
            "POLLEN_REDIS_URL": self.state_url,
            "POLLEN_RESULT_BACKEND": self.backend_url,
            "POLLEN_NAMESPACE": NAMESPACE,
            # generous: a loaded worker answers late, not never
            "POLLEN_INSPECT_TIMEOUT": "10",
        }
        env.update({f"POLLEN_{k.upper()}": v for k, v in overrides.items()})
        return load(env)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("control")
    server = RedisServer(logs / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    state_url = f"redis://127.0.0.1:{server.port}/1"
    hostname = "ctl-w1@test"
    processes: list[Process] = []
    try:
        processes.append(collector(broker, state_url, logs / "collector.log"))
        processes.append(
            enabler(
                broker, state_url, logs / "enabler.log", enable_interval="2", queue_interval="1"
            )
        )
        w = celery_worker(
            broker,
            logs / "worker.log",
            hostname,
            pool="prefork",
            concurrency=2,
            env={"DEMO_RESULT_BACKEND": f"redis://127.0.0.1:{server.port}/2"},
        )
        processes.append(w)
        wait_worker_up(broker, hostname)
        state = redis.Redis(port=server.port, db=1)
        # the worker is known from its events and its registered tasks from the enabler
        wait_for(
            lambda: "registered" in inspect_data(state, _keys(), hostname),
            timeout=30,
            message="the worker inspected by the enabler",
        )
        state.close()
        yield Stack(server, w, hostname, logs)
    finally:
        stop_all(*reversed(processes))
        server.stop()


def _keys() -> Any:
    from tests.support.cluster import KEYS

    return KEYS


ApiFactory = Callable[..., Any]


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[ApiFactory]:
    """``await api(**settings)``: an in-process API client (the real app factory)."""
    clients: list[TestClient[Any, Any]] = []

    async def make(**overrides: str) -> TestClient[Any, Any]:
        test_client: TestClient[Any, Any] = TestClient(
            TestServer(make_app(stack.settings(**overrides)))
        )
        await test_client.start_server()
        clients.append(test_client)
        return test_client

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
def state(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis(port=stack.server.port, db=1)
    yield client
    client.close()
