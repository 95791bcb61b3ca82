"""The broker side of the enabler and of the API's control endpoints.

``celery_app`` builds the Celery app both use to broadcast control/inspect commands and to
publish tasks; ``QueueSampler`` measures queue lengths (Redis: LLEN of each queue and its
priority sub-queues; RabbitMQ: passive declare, or the management API when configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlparse

import aiohttp
import redis.asyncio
from celery import Celery
from kombu import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from shared.settings import Settings

#: kombu's Redis transport: priority sub-queues are ``<queue><SEP><step>`` for steps > 0.
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)

#: What a broker outage raises from celery/kombu calls (kombu wraps most in OperationalError).
BROKER_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)


def broker_errors(app: Celery | None = None) -> tuple[type[BaseException], ...]:
    """What a broker outage raises from celery/kombu calls: kombu's wrappers plus, given the
    app, its transport's connection errors (redis-py's or py-amqp's)."""
    from kombu.exceptions import ConnectionError as KombuConnectionError
    from kombu.exceptions import OperationalError

    errors: tuple[type[BaseException], ...] = (
        *BROKER_ERRORS,
        OperationalError,
        KombuConnectionError,
    )
    if app is not None:
        # reading these properties does not connect
        conn = app.connection_for_write()
        errors += tuple(conn.connection_errors) + tuple(conn.recoverable_connection_errors)
    return tuple(dict.fromkeys(errors))


def celery_app(settings: Settings, name: str = "pollen") -> Celery:
    """A Celery app on ``POLLEN_BROKER_URL`` (and ``POLLEN_RESULT_BACKEND``) that fails fast:
    a broker outage raises within about a second instead of retrying for minutes."""
    app = Celery(name, broker=settings.broker_url, backend=settings.result_backend or None)
    app.conf.update(
        broker_connection_timeout=2,
        broker_connection_retry=False,
        broker_connection_max_retries=1,
        broker_transport_options={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        broker_pool_limit=16,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        result_backend_transport_options={"retry_policy": {"max_retries": 1}},
        redis_socket_connect_timeout=2,
        redis_socket_timeout=5,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


def transport_of(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "amqp"
    if scheme in ("redis", "rediss"):
        return "redis"
    return scheme


class QueueSampler:
    """Measures the length of named queues on the broker; one instance per enabler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transport = transport_of(settings.broker_url)
        self._redis: Any = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def supported(self) -> bool:
        return self.transport in ("redis", "amqp")

    async def sample(self, names: list[str]) -> list[dict[str, Any]]:
        """``[{"name", "messages", "consumers", "time"}]`` for the queues that exist (on Redis
        every name exists: an absent list is an empty queue). Broker errors propagate."""
        if self.transport == "redis":
            return await self._redis_lengths(names)
        if self.transport == "amqp":
            if self.settings.broker_api:
                return await self._management_lengths(names)
            return await asyncio.to_thread(self._amqp_lengths, names)
        return []

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _redis_lengths(self, names: list[str]) -> list[dict[str, Any]]:
        if self._redis is None:
            self._redis = redis.asyncio.Redis.from_url(
                self.settings.broker_url,
                socket_timeout=5,
                socket_connect_timeout=2,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            )
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            for step in REDIS_PRIORITY_STEPS:
                pipe.llen(f"{name}{REDIS_PRIORITY_SEP}{step}" if step else name)
        lengths = iter(await pipe.execute())
        now = time.time()
        return [
            {
                "name": name,
                "messages": sum(next(lengths) for _ in REDIS_PRIORITY_STEPS),
                "consumers": None,
                "time": now,
            }
            for name in names
        ]

    def _amqp_lengths(self, names: list[str]) -> list[dict[str, Any]]:
        from amqp.exceptions import NotFound

        out: list[dict[str, Any]] = []
        with Connection(self.settings.broker_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            try:
                for name in names:
                    try:
                        _, messages, consumers = channel.queue_declare(queue=name, passive=True)
                    except NotFound:
                        # a failed passive declare closes the channel: open another one
                        channel = conn.channel()
                        continue
                    out.append(
                        {
                            "name": name,
                            "messages": int(messages),
                            "consumers": int(consumers),
                            "time": time.time(),
                        }
                    )
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return out

    def management_url(self) -> tuple[str, aiohttp.BasicAuth | None]:
        """The management API's queue list URL of the broker's vhost, and its credentials."""
        broker = urlparse(self.settings.broker_url)
        api = urlparse(self.settings.broker_api)
        vhost = unquote(broker.path[1:]) if broker.path not in ("", "/") else "/"
        base = (
            self.settings.broker_api
            if self.settings.broker_api.endswith("/")
            else (self.settings.broker_api + "/")
        )
        url = urljoin(base, "queues/" + quote(vhost, safe=""))
        if api.username:
            user, password = unquote(api.username), unquote(api.password or "")
        else:
            user = unquote(broker.username or "guest")
            password = unquote(broker.password or "guest")
        netloc = api.hostname or ""
        if api.port:
            netloc += f":{api.port}"
        url = url.replace(api.netloc, netloc, 1)
        return url, aiohttp.BasicAuth(user, password)

    async def _management_lengths(self, names: list[str]) -> list[dict[str, Any]]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        url, auth = self.management_url()
        async with self._http.get(url, auth=auth) as response:
            response.raise_for_status()
            info = await response.json()
        wanted = set(names)
        now = time.time()
        return [
            {
                "name": q["name"],
                "messages": int(q.get("messages") or 0),
                "consumers": int(q.get("consumers") or 0),
                "time": now,
            }
            for q in info
            if isinstance(q, dict) and q.get("name") in wanted
        ]
