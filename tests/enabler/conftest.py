"""A private redis-server per test module: broker on db 0, Pollen's state on db 1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.servers import RedisServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("enabler-redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def broker_url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


@pytest.fixture
def state_url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/1"


@pytest.fixture
def state(server: RedisServer) -> Iterator[redis.Redis]:
    """Pollen's state db, emptied (with the broker's db) before the test."""
    client = redis.Redis(port=server.port, db=1)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path
