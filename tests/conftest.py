"""Session-wide real servers: one private redis-server and, where RabbitMQ runs, a fresh vhost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.settings import Settings, load
from tests.support.servers import RedisServer, rabbitmq_available, rabbitmq_vhost


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the private Redis, emptied before each test."""
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return load(
        {
            "POLLEN_REDIS_URL": redis_server.url,
            "POLLEN_NAMESPACE": "test",
        }
    )


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    if not rabbitmq_available():
        pytest.fail(
            "RabbitMQ is not running on 127.0.0.1:5672: run .ci/run, or "
            "`apt-get install rabbitmq-server && rabbitmq-server -detached`"
        )
    with rabbitmq_vhost() as url:
        yield url


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
