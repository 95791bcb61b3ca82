"""API test fixtures: real ``python -m services.api`` processes over the session's Redis.

State is written by the collector's own write path (``Writer`` through ``tests.support.readback``),
or by the real collector process in the end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.api import Api, api_env
from tests.support.servers import RedisServer


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Start API processes: ``start_api(server, namespace, **settings)``; stopped afterwards."""
    started: list[Api] = []

    def start(server: RedisServer, namespace: str = "test", **settings: str) -> Api:
        api = Api(api_env(server, namespace, **settings), tmp_path / f"api{len(started)}.log")
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()
