"""Where event messages come from: RabbitMQ (AMQP) or a Redis broker's pub/sub.

Both give the collector the same thing: raw message bodies with their content type and the
time they were received, in batches, and a way to acknowledge a batch once it is committed.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec
import redis
from celery.events.event import get_exchange
from kombu import Connection, Consumer, Queue
from kombu.exceptions import OperationalError

from shared.backoff import Backoff

log = logging.getLogger("pollen.collector")

EVENT_EXCHANGE = "celeryev"


@dataclass(slots=True)
class Incoming:
    body: bytes
    content_type: str
    content_encoding: str
    received: float
    #: AMQP delivery (acknowledged after commit); None for pub/sub.
    delivery: Any = None


class Source(Protocol):
    name: str

    def fetch(self, max_messages: int, wait: float) -> list[Incoming]:
        """Up to ``max_messages``: blocks up to ``wait`` seconds for the first, then takes
        what else is already there, without waiting. (Batches grow by themselves when events
        come faster than Redis takes them; a lone event is applied at once.) Raises the
        broker's connection errors."""

    def ack(self, batch: list[Incoming]) -> None:
        """Acknowledge every message of ``batch`` (after it is committed to Redis)."""

    def close(self) -> None: ...


def open_source(broker_url: str, event_queue: str, queue_expires: float, prefetch: int) -> Source:
    scheme = urlsplit(broker_url).scheme
    if scheme in ("redis", "rediss", "unix", "redis+socket"):
        return RedisPubSubSource(broker_url)
    return AmqpSource(broker_url, event_queue, queue_expires, prefetch)


class AmqpSource:
    """A queue bound to ``celeryev`` with routing key ``#``, consumed with manual acks.

    With a name: durable, shared by every collector using it, kept ``queue_expires`` seconds
    without consumers, so a restarted collector catches up. Without: exclusive and deleted
    with the connection, as Flower's (but with no message TTL, so nothing is dropped while
    the collector is slow).
    """

    name = "amqp"

    def __init__(self, url: str, event_queue: str, queue_expires: float, prefetch: int) -> None:
        self.url = url
        self.event_queue = event_queue
        self.queue_expires = queue_expires
        self.prefetch = prefetch
        self.conn: Connection | None = None
        self.consumer: Consumer | None = None
        self.channel: Any = None
        self.pending: list[Incoming] = []

    def _connect(self) -> None:
        # a connection name shows which connection is Pollen's in RabbitMQ's management tools
        name = f"pollen-collector {socket.gethostname()}:{os.getpid()}"
        conn = Connection(
            self.url,
            heartbeat=30,
            connect_timeout=5,
            transport_options={"client_properties": {"connection_name": name}},
        )
        conn.ensure_connection(max_retries=1)
        exchange = get_exchange(conn, name=EVENT_EXCHANGE)
        if self.event_queue:
            q = Queue(
                self.event_queue,
                exchange,
                routing_key="#",
                durable=True,
                auto_delete=False,
                queue_arguments={"x-expires": int(self.queue_expires * 1000)},
            )
        else:
            q = Queue(
                f"pollen.{uuid.uuid4().hex}",
                exchange,
                routing_key="#",
                durable=False,
                auto_delete=True,
                exclusive=True,
            )
        channel = conn.default_channel
        channel.basic_qos(0, self.prefetch, False)
        consumer = Consumer(
            # on_message, not callbacks: kombu would decode every body only for us to drop it
            channel,
            queues=[q],
            on_message=self._on_message,
            no_ack=False,
            accept=None,
        )
        consumer.consume()
        self.conn, self.consumer, self.channel = conn, consumer, channel

    def _on_message(self, message: Any) -> None:
        raw = message.body
        if isinstance(raw, str):
            raw = raw.encode(message.content_encoding or "utf-8")
        self.pending.append(
            Incoming(
                raw,
                message.content_type or "",
                message.content_encoding or "",
                time.time(),
                message,
            )
        )

    def fetch(self, max_messages: int, wait: float) -> list[Incoming]:
        if self.conn is None:
            self._connect()
        assert self.conn is not None
        timeout = wait
        while len(self.pending) < max_messages:
            try:
                self.conn.drain_events(timeout=timeout)
            except TimeoutError:
                break
            timeout = 0  # after the first: only what is already there
        batch, self.pending = self.pending[:max_messages], self.pending[max_messages:]
        return batch

    def ack(self, batch: list[Incoming]) -> None:
        if batch:
            last = batch[-1].delivery
            if last.channel is not self.channel:
                return  # received on a connection since lost: the broker redelivers them
            last.channel.basic_ack(last.delivery_tag, multiple=True)

    def close(self) -> None:
        self.pending = []
        if self.conn is not None:
            try:
                self.conn.release()
            except Exception:  # closing a broken connection may fail; nothing to keep
                log.debug("closing the AMQP connection failed", exc_info=True)
        self.conn = self.consumer = self.channel = None

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        conn = self.conn or Connection(self.url)
        # ensure_connection() raises a refused connection (broker restarting) as OperationalError
        return (*conn.connection_errors, *conn.channel_errors, OperationalError)


class _KombuEnvelope(msgspec.Struct):
    """kombu's Redis transport wraps each message in this JSON envelope."""

    body: str
    content_type: str = msgspec.field(name="content-type", default="application/json")
    content_encoding: str = msgspec.field(name="content-encoding", default="utf-8")
    properties: dict[str, Any] = {}


_envelope = msgspec.json.Decoder(_KombuEnvelope)


class RedisPubSubSource:
    """``PSUBSCRIBE /{db}.celeryev/*`` on the broker, as celery's receivers do.

    Pub/sub stores nothing: what is published while no collector listens is gone, so run two
    collectors side by side (the apply is idempotent). A reader thread drains the socket
    continuously so a slow Redis write never makes the broker drop this subscriber.
    """

    name = "redis"

    def __init__(self, url: str, buffer_limit: int = 200_000) -> None:
        self.url = url
        db = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0)
        self.channel_prefix = f"/{db}.{EVENT_EXCHANGE}"
        self.buffer: queue.Queue[Incoming] = queue.Queue(maxsize=buffer_limit)
        self.dropped = 0
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._read, name="pubsub-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        backoff = Backoff("broker (redis pub/sub)", log)
        while not self.stopping.is_set():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_keepalive=True)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(self.channel_prefix + "/*")
                pubsub.subscribe(self.channel_prefix)
                self.connected.set()
                backoff.recovered()
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None or message["type"] not in ("message", "pmessage"):
                        continue
                    self._put(message["data"])
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self.connected.clear()
                backoff.failed(exc)
                self.stopping.wait(backoff.delay())
            finally:
                try:
                    pubsub.close()
                    client.close()
                except Exception:  # already broken
                    log.debug("closing pub/sub failed", exc_info=True)

    def _put(self, data: bytes) -> None:
        item = Incoming(data, "kombu/redis-envelope", "", time.time())
        try:
            self.buffer.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def fetch(self, max_messages: int, wait: float) -> list[Incoming]:
        out: list[Incoming] = []
        try:
            out.append(self.buffer.get(timeout=wait))
        except queue.Empty:
            return out
        while len(out) < max_messages:
            try:
                out.append(self.buffer.get_nowait())
            except queue.Empty:
                break
        return [_unwrap(item) for item in out]

    def ack(self, batch: list[Incoming]) -> None:
        """Nothing to acknowledge on pub/sub."""

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def _unwrap(item: Incoming) -> Incoming:
    """The kombu envelope's body, or the payload as is when it is not an envelope (then the
    decoder reports it)."""
    try:
        env = _envelope.decode(item.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Incoming(item.body, "application/json", "utf-8", item.received)
    body: bytes
    if env.properties.get("body_encoding") == "base64":
        try:
            body = base64.b64decode(env.body, validate=False)
        except ValueError:
            body = env.body.encode()
    else:
        body = env.body.encode()
    return Incoming(body, env.content_type, env.content_encoding, item.received)
