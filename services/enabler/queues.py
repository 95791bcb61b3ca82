"""Queue lengths on the broker, for the enabler.

Through the Celery app's own kombu channel, so a Redis broker's priority sub-queues, its
``global_keyprefix``, Sentinel and TLS are handled exactly as the workers see the queues:
RabbitMQ answers a passive declare (messages and consumers), Redis the summed ``LLEN`` of the
queue and its priority lists. With ``POLLEN_BROKER_API`` RabbitMQ's management API is asked
instead, in one request for every queue.

The oldest waiting message, where the broker can tell without touching it: on Redis the last
element of each list (kombu pushes on the left and workers pop on the right), read with
``LINDEX``, its task id and AMQP-style ``timestamp`` property (the enabler then takes the
task-sent time Pollen holds when the message has no timestamp); on RabbitMQ the management
API's ``head_message_timestamp``, known when messages carry the ``timestamp`` property (a
passive declare cannot tell, and fetching a message to look at it would mark it redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlparse

import aiohttp
import msgspec
from celery import Celery

from shared.broker import transport
from shared.settings import Settings

#: A Redis sample's task ids of its lists' oldest messages, when none has a timestamp: the
#: enabler replaces it with ``oldest`` from the task-sent times Pollen holds (``resolve_oldest``).
UNRESOLVED = "_heads"


def oldest(task_id: str | None, since: float | None, now: float) -> dict[str, Any]:
    """A sample's ``oldest`` entry: the message's task id (when known), when it was sent and
    its age at the sample (null when neither the message nor Pollen tells)."""
    return {
        "task_id": task_id,
        "since": since,
        "age": max(0.0, now - since) if since is not None else None,
    }


def peeked_message(raw: bytes | None) -> tuple[str | None, float | None] | None:
    """The task id and ``timestamp`` property of a kombu Redis message (JSON), or None when
    there is no message; a message that is not kombu's gives ``(None, None)``."""
    if raw is None:
        return None
    try:
        message = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None, None
    if not isinstance(message, dict):
        return None, None
    headers = message.get("headers")
    properties = message.get("properties")
    headers = headers if isinstance(headers, dict) else {}
    properties = properties if isinstance(properties, dict) else {}
    task_id = headers.get("id") or properties.get("correlation_id")
    stamp = properties.get("timestamp")
    return (
        task_id if isinstance(task_id, str) else None,
        float(stamp) if isinstance(stamp, int | float) and not isinstance(stamp, bool) else None,
    )


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
        """``[{"name", "messages", "consumers", "time", "oldest"}]`` for the queues that exist
        (on Redis every name exists: an absent list is an empty queue). ``oldest`` is null when
        the queue is empty or the broker cannot tell; a Redis sample's may lack ``since`` (then
        the enabler looks up the task-sent time). Broker errors propagate."""
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
                    now = time.time()
                    heads = [] if passive or not messages else self._redis_heads(channel, name)
                    stamped = [h for h in heads if h[1] is not None]
                    first = min(stamped, key=lambda h: h[1] or 0.0) if stamped else None
                    sample: dict[str, Any] = {
                        "name": name,
                        "messages": int(messages),
                        "consumers": int(consumers) if passive else None,
                        "time": now,
                        "oldest": oldest(*first, now) if first else None,
                    }
                    if heads and not first:
                        # no timestamps: the enabler picks the one sent first (task-sent)
                        sample[UNRESOLVED] = [h[0] for h in heads if h[0]]
                    out.append(sample)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return out

    @staticmethod
    def _redis_heads(channel: Any, name: str) -> list[tuple[str | None, float | None]]:
        """The oldest message of each of a Redis queue's priority lists (its last element):
        task id and timestamp property."""
        with channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            for priority in channel.priority_steps:
                pipe.lindex(channel._q_for_pri(name, priority), -1)
            heads = [peeked_message(raw) for raw in pipe.execute()]
        return [h for h in heads if h is not None]

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
                # seconds since the epoch of the head message's timestamp property, when it has
                # one (RabbitMQ leaves the field out otherwise)
                "oldest": oldest(None, float(q["head_message_timestamp"]), now)
                if isinstance(q.get("head_message_timestamp"), int | float)
                else None,
            }
            for q in info
            if isinstance(q, dict) and q.get("name") in wanted
        ]
