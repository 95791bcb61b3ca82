"""What every handler reaches through ``request.app``: settings, the Redis client, key names,
the query engine and the event hub. Nothing here holds data that would make two replicas
answer differently: all state is in Redis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.api.query import QueryEngine
from shared import scripts
from shared.connections import async_client
from shared.keys import Keys
from shared.settings import Settings


@dataclass(slots=True)
class Context:
    settings: Settings
    keys: Keys
    redis: Any
    engine: QueryEngine
    #: shared/lua/task_json.lua: tasks as spliced JSON objects
    task_json: Any


CONTEXT = web.AppKey("pollen.context", Context)


def ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


def make_redis(settings: Settings) -> Any:
    """A client that fails fast when Redis is away (short timeouts, one immediate retry, so a
    connection dropped by a Redis restart is replaced) and recovers by itself."""
    return async_client(
        settings,
        socket_timeout=settings.api_redis_timeout,
        socket_connect_timeout=settings.api_redis_timeout,
        retry=Retry(NoBackoff(), 1),
    )


def make_context(settings: Settings, client: Any | None = None) -> Context:
    client = client if client is not None else make_redis(settings)
    keys = Keys(settings.namespace, settings.shards)
    engine = QueryEngine(
        client,
        keys,
        scripts.register(client, "query_tasks"),
        settings.search_scan_limit,
        settings.query_time_limit,
    )
    return Context(settings, keys, client, engine, scripts.register(client, "task_json"))
