"""Redis clients for Pollen's state, standalone or cluster, sync or asyncio, from the settings.

Timeouts are always set: a Redis outage must turn into a fast error and a retry, never a hang.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from shared.settings import Settings

SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0

#: What a Redis outage raises, for ``except`` clauses of every service.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    OSError,
)


def sync_client(settings: Settings, **kwargs: Any) -> Any:
    """A ``redis.Redis`` (or ``RedisCluster``) for ``POLLEN_REDIS_URL``."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        **kwargs,
    }
    if settings.redis_cluster:
        return redis.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def async_client(settings: Settings, **kwargs: Any) -> Any:
    """A ``redis.asyncio.Redis`` (or its ``RedisCluster``) for ``POLLEN_REDIS_URL``."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        **kwargs,
    }
    if settings.redis_cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.asyncio.Redis.from_url(settings.redis_url, **options)
