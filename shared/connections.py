"""Redis clients for Pollen's state, from ``POLLEN_REDIS_URL``: standalone, TLS, Sentinel or
cluster, sync or asyncio.

- ``redis://``, ``rediss://`` (TLS; certificate options in the query, as redis-py takes them:
  ``?ssl_ca_certs=/ca.pem&ssl_certfile=...&ssl_keyfile=...``) and ``unix://``.
- ``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/<db>]`` (or
  ``rediss+sentinel://`` for TLS to the sentinels and the master): the master is asked of the
  sentinels on every new connection, so after a failover a reconnect reaches the new master.
  ``sentinel_password``/``sentinel_username`` in the query authenticate to the sentinels.
- ``POLLEN_REDIS_CLUSTER=1``: the URL is one node of a Redis Cluster.

Timeouts are always set: a Redis outage must turn into a fast error and a retry, never a hang.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.connection import SSLConnection, parse_url

from shared.settings import Sentinel, Settings

SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0

#: What a Redis outage raises, for ``except`` clauses of every service. (Under Sentinel, a
#: master that was demoted answers with a ConnectionError too, and no master at all is a
#: MasterNotFoundError, itself a ConnectionError.)
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    OSError,
)


#: Redis server settings Pollen's data is sized for (docs/operations.md). A hash holding a value
#: longer than ``hash-max-listpack-value`` (64 bytes by default: a traceback, a long result)
#: leaves Redis's compact listpack encoding and takes about three times the memory; 4096 keeps
#: typical failed tasks compact (a task's fields are few, so its hash stays small to rewrite).
#: Spelled by its older name, which Redis 7 keeps as an alias and Redis 6 knows.
RECOMMENDED_CONFIG = {"hash-max-ziplist-value": 4096}


def redis_server_args() -> list[str]:
    """``RECOMMENDED_CONFIG`` as redis-server command-line options."""
    return [a for name, value in RECOMMENDED_CONFIG.items() for a in (f"--{name}", str(value))]


def config_advice(client: Any) -> list[str]:
    """What differs from ``RECOMMENDED_CONFIG`` on the server, as ``name is X; Pollen is sized
    for Y`` lines; none when the server refuses ``CONFIG GET`` (as managed services may)."""
    out = []
    for name, wanted in RECOMMENDED_CONFIG.items():
        try:
            reply = client.config_get(name)
        except Exception:  # CONFIG renamed or refused, a cluster or a proxy: nothing to say
            return []
        values = list(reply.values()) if isinstance(reply, dict) else []
        value = values[0] if values else None
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value.isdigit() and int(value) < wanted:
            out.append(f"{name} is {value}; Pollen is sized for {wanted}")
    return out


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        **kwargs,
    }


def _sentinel_kwargs(sentinel: Sentinel, options: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """``(sentinels' connection kwargs, master's connection kwargs)`` from the URL's parts."""
    # the query's certificate and timeout options, parsed as redis-py parses a URL's
    query = parse_url(("rediss" if sentinel.ssl else "redis") + "://x/0?" + sentinel.query)
    query.pop("host", None)
    query.pop("db", None)
    if query.pop("connection_class", None) is SSLConnection:
        query["ssl"] = True
    master = {**options, **query, "db": sentinel.db}
    if sentinel.username:
        master["username"] = sentinel.username
    if sentinel.password:
        master["password"] = sentinel.password
    to_sentinels = {
        k: v for k, v in master.items() if k not in ("db", "username", "password", "retry")
    }
    if sentinel.sentinel_username:
        to_sentinels["username"] = sentinel.sentinel_username
    if sentinel.sentinel_password:
        to_sentinels["password"] = sentinel.sentinel_password
    return to_sentinels, master


def sync_client(settings: Settings, plain: bool = False, **kwargs: Any) -> Any:
    """A ``redis.Redis`` (or ``RedisCluster``) for ``POLLEN_REDIS_URL``. ``plain``: a client
    of the one node named, even in a cluster (PUBLISH reaches subscribers on every node)."""
    options = _options(kwargs)
    sentinel = settings.redis_sentinel
    if sentinel is not None:
        to_sentinels, master = _sentinel_kwargs(sentinel, options)
        return redis.sentinel.Sentinel(sentinel.hosts, sentinel_kwargs=to_sentinels).master_for(
            sentinel.service, **master
        )
    if settings.redis_cluster and not plain:
        return redis.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def async_client(settings: Settings, plain: bool = False, **kwargs: Any) -> Any:
    """A ``redis.asyncio.Redis`` (or its ``RedisCluster``) for ``POLLEN_REDIS_URL``."""
    options = _options(kwargs)
    sentinel = settings.redis_sentinel
    if sentinel is not None:
        to_sentinels, master = _sentinel_kwargs(sentinel, options)
        return redis.asyncio.sentinel.Sentinel(
            sentinel.hosts, sentinel_kwargs=to_sentinels
        ).master_for(sentinel.service, **master)
    if settings.redis_cluster and not plain:
        return redis.asyncio.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.asyncio.Redis.from_url(settings.redis_url, **options)
