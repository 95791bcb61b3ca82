"""Where event messages come from: RabbitMQ (AMQP) or a Redis broker's pub/sub.

Both give the collector the same thing: raw message bodies with their content type and the
time they were received, in batches, and a way to acknowledge a batch once it is committed.
Both connect through the Celery app (``shared.broker``), so the exchange name, TLS, Sentinel,
``global_keyprefix`` and fanout prefixes are exactly what the user's workers publish with.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery
from celery.events.event import get_exchange
from kombu import Connection, Consumer, Queue
from kombu.exceptions import OperationalError

from shared.backoff import Backoff
from shared.broker import broker_errors, event_exchange, transport

log = logging.getLogger("pollen.collector")


@dataclass(slots=True)
class Incoming:
    body: bytes
    content_type: str
    content_encoding: str
    received: float
    #: AMQP delivery (acknowledged after commit); None for pub/sub.
    delivery: Any = None


def _incoming(message: Any, delivery: Any = None) -> Incoming:
    raw = message.body
    if isinstance(raw, str):
        raw = raw.encode(message.content_encoding or "utf-8")
    return Incoming(
        raw, message.content_type or "", message.content_encoding or "", time.time(), delivery
    )


def _connection(app: Celery, role: str) -> Connection:
    # a connection name shows which connection is Pollen's in RabbitMQ's management tools
    name = f"pollen-collector {role} {socket.gethostname()}:{os.getpid()}"
    conn: Connection = app.connection_for_read(
        heartbeat=30,
        connect_timeout=5,
        transport_options={"client_properties": {"connection_name": name}},
    )
    return conn


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


def _private_queue(exchange: Any) -> Queue:
    """This collector's own queue of every event, gone with its connection (as Flower's)."""
    return Queue(
        f"pollen.{uuid.uuid4().hex}",
        exchange,
        routing_key="#",
        durable=False,
        auto_delete=True,
        exclusive=True,
    )


def open_source(app: Celery, event_queue: str, queue_expires: float, prefetch: int) -> Source:
    kind = transport(app)
    if kind == "redis":
        return RedisPubSubSource(app)
    if kind == "amqp":
        return AmqpSource(app, event_queue, queue_expires, prefetch)
    raise ValueError(
        f"the broker's transport {kind!r} carries no events Pollen can read"
        " (RabbitMQ/AMQP and Redis, with TLS or Sentinel, are supported)"
    )


class AmqpSource:
    """A queue bound to ``celeryev`` with routing key ``#``, consumed with manual acks.

    With a name: durable, shared by every collector using it, kept ``queue_expires`` seconds
    without consumers, so a restarted collector catches up. Without: exclusive and deleted
    with the connection, as Flower's (but with no message TTL, so nothing is dropped while
    the collector is slow).
    """

    name = "amqp"

    def __init__(self, app: Celery, event_queue: str, queue_expires: float, prefetch: int) -> None:
        self.app = app
        self.event_queue = event_queue
        self.queue_expires = queue_expires
        self.prefetch = prefetch
        self.conn: Connection | None = None
        self.consumer: Consumer | None = None
        self.channel: Any = None
        self.pending: list[Incoming] = []

    def _connect(self) -> None:
        conn = _connection(self.app, "events")
        conn.ensure_connection(max_retries=1)
        exchange = get_exchange(conn, name=event_exchange(self.app))
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
            q = _private_queue(exchange)
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
        self.pending.append(_incoming(message, message))

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
        conn = self.conn or self.app.connection_for_read()
        # ensure_connection() raises a refused connection (broker restarting) as OperationalError
        return (*conn.connection_errors, *conn.channel_errors, OperationalError)


class RedisPubSubSource:
    """The event exchange's fanout on a Redis broker (pub/sub), as celery's receivers read it.

    Pub/sub stores nothing: what is published while no collector listens is gone, so run two
    collectors side by side (the apply is idempotent). A reader thread owns the kombu
    connection and drains it continuously, so a slow Redis write never makes the broker drop
    this subscriber; after an error it reconnects (to a new master, under Sentinel).
    """

    name = "redis"

    def __init__(self, app: Celery, buffer_limit: int = 200_000) -> None:
        self.app = app
        self.buffer: queue.Queue[Incoming] = queue.Queue(maxsize=buffer_limit)
        self.dropped = 0
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._read, name="pubsub-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        backoff = Backoff("broker (redis pub/sub)", log)
        errors: tuple[type[BaseException], ...] = (*broker_errors(self.app), socket.timeout)
        while not self.stopping.is_set():
            conn = _connection(self.app, "events")
            try:
                conn.ensure_connection(max_retries=1)
                events = _private_queue(get_exchange(conn, name=event_exchange(self.app)))
                # no_ack: pub/sub has nothing to acknowledge, and kombu would otherwise keep
                # every event in the broker's unacked hash
                consumer = Consumer(
                    conn, queues=[events], on_message=self._put, no_ack=True, accept=None
                )
                with consumer:
                    self.connected.set()
                    backoff.recovered()
                    while not self.stopping.is_set():
                        try:
                            conn.drain_events(timeout=0.5)
                        except TimeoutError:
                            conn.heartbeat_check()
            except errors as exc:
                self.connected.clear()
                backoff.failed(exc)
                self.stopping.wait(backoff.delay())
            except Exception as exc:
                # anything else (an odd reply, a kombu bug) must not end the thread: the
                # collector would go on running and never receive another event
                log.exception("the pub/sub reader failed; reconnecting")
                self.connected.clear()
                backoff.failed(exc)
                self.stopping.wait(backoff.delay())
            finally:
                try:
                    conn.release()
                except Exception:  # already broken
                    log.debug("closing the pub/sub connection failed", exc_info=True)

    def _put(self, message: Any) -> None:
        try:
            self.buffer.put_nowait(_incoming(message))
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
        return out

    def ack(self, batch: list[Incoming]) -> None:
        """Nothing to acknowledge on pub/sub."""

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
