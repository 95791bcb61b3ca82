"""Queue lengths on the broker, for the enabler.

Through the Celery app's own kombu channel, so a Redis broker's priority sub-queues, its
``global_keyprefix``, Sentinel and TLS are handled exactly as the workers see the queues:
RabbitMQ answers a passive declare (messages and consumers), Redis the summed ``LLEN`` of the
queue and its priority lists. With ``POLLEN_BROKER_API`` RabbitMQ's management API is asked
instead, in one request for every queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlparse

import aiohttp
from celery import Celery

from shared.broker import transport
from shared.settings import Settings


class QueueSampler:
    """Measures the length of named queues on the broker; one instance per enabler."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self.transport = transport(app)
        self._http: aiohttp.ClientSession | None = None

    @property
    def supported(self) -> bool:
        return self.transport in ("redis", "amqp")

    async def sample(self, names: list[str]) -> list[dict[str, Any]]:
        """``[{"name", "messages", "consumers", "time"}]`` for the queues that exist (on Redis
        every name exists: an absent list is an empty queue). Broker errors propagate."""
        if not self.supported:
            return []
        if self.transport == "amqp" and self.settings.broker_api:
            return await self._management_lengths(names)
        return await asyncio.to_thread(self._kombu_lengths, names)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _kombu_lengths(self, names: list[str]) -> list[dict[str, Any]]:
        # RabbitMQ: passive, so sampling never creates a queue. Redis: a declare only reads
        # (kombu's Redis queues are lists that exist once they hold a message).
        passive = self.transport == "amqp"
        out: list[dict[str, Any]] = []
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            try:
                for name in names:
                    try:
                        _, messages, consumers = channel.queue_declare(queue=name, passive=passive)
                    except conn.channel_errors:
                        # no such queue; a failed passive declare closes the channel
                        channel = conn.channel()
                        continue
                    out.append(
                        {
                            "name": name,
                            "messages": int(messages),
                            "consumers": int(consumers) if passive else None,
                            "time": time.time(),
                        }
                    )
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return out

    def management_url(self) -> tuple[str, aiohttp.BasicAuth | None]:
        """The management API's queue list URL of the broker's vhost, and its credentials
        (the API URL's own, else the broker's: kombu reads them from the URL or the app)."""
        broker = self.app.connection_for_read()
        api = urlparse(self.settings.broker_api)
        vhost = broker.virtual_host or "/"
        base = (
            self.settings.broker_api
            if self.settings.broker_api.endswith("/")
            else (self.settings.broker_api + "/")
        )
        url = urljoin(base, "queues/" + quote(vhost, safe=""))
        if api.username:
            user, password = unquote(api.username), unquote(api.password or "")
        else:
            user, password = broker.userid or "guest", broker.password or "guest"
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
