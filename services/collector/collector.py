"""The collector's loop: fetch a batch, decode it, commit it to Redis, then acknowledge it.

A batch is acknowledged only after Redis has it, so on RabbitMQ nothing is lost when the
collector or Redis fails: unacknowledged events are redelivered, and applying an event twice
changes nothing. Outages of Redis or of the broker are waited out with capped backoff.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from services.collector.decode import Decoded, Decoder
from services.collector.health import Health
from services.collector.sources import AmqpSource, Incoming, Source, open_source
from services.collector.writer import Writer
from shared.backoff import Backoff
from shared.connections import REDIS_ERRORS, sync_client
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("pollen.collector")

HEALTH_INTERVAL = 1.0
AGE_CHECK_INTERVAL = 1.0


class Collector:
    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace, settings.shards)
        self.redis = client if client is not None else sync_client(settings)
        self.writer = Writer(self.redis, settings)
        self.decoder = Decoder(settings.max_field_bytes)
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        self.source: Source | None = None
        self.health: Health | None = None
        self._last_age_check = 0.0
        self._last_health = 0.0

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        settings = self.settings
        source = open_source(
            settings.broker_url,
            settings.event_queue,
            settings.event_queue_expires,
            prefetch=settings.batch_size,
        )
        self.source = source
        self.health = health = Health(self.keys, self.id, source.name)
        log.info(
            "collector %s consuming from %s (%s%s) into %s, namespace %r, %d shard(s)",
            self.id,
            _redact(settings.broker_url),
            source.name,
            f", queue {settings.event_queue!r}" if settings.event_queue else "",
            _redact(settings.redis_url),
            settings.namespace,
            settings.shards,
        )
        broker = Backoff("broker", log)
        broker_errors: tuple[type[BaseException], ...] = (OSError, ConnectionError)
        if isinstance(source, AmqpSource):
            broker_errors = source.connection_errors
        try:
            while not self.stopping.is_set():
                try:
                    batch = source.fetch(settings.batch_size, settings.batch_interval)
                    broker.recovered()
                except broker_errors as exc:
                    broker.failed(exc)
                    health.error("broker")
                    source.close()
                    self.stopping.wait(broker.delay())
                    continue
                if isinstance(source, AmqpSource) is False:
                    health.dropped = getattr(source, "dropped", 0)
                if not self._commit(batch):
                    break  # stopping during a Redis outage: leave the batch unacknowledged
                try:
                    source.ack(batch)
                except broker_errors as exc:
                    # the batch is in Redis; the broker will redeliver it, and a redelivered
                    # event is recognised and skipped
                    broker.failed(exc)
                    health.error("broker")
                    source.close()
                self._flush_health()
        finally:
            source.close()
            self._flush_health(force=True)
            log.info("collector %s stopped", self.id)

    def _decode(self, batch: list[Incoming]) -> list[Decoded]:
        assert self.health is not None
        events: list[Decoded] = []
        for message in batch:
            result = self.decoder.decode(
                message.body, message.content_type, message.content_encoding, message.received
            )
            events.extend(result.events)
            for bad in result.bad:
                self.health.bad(bad.reason, bad.sample)
            if result.truncated:
                self.health.truncated(result.truncated)
        return events

    def _commit(self, batch: list[Incoming]) -> bool:
        """Apply the batch (and retention) until Redis takes it; False if told to stop first."""
        assert self.health is not None
        events = self._decode(batch)
        now = time.time()
        age_check = now - self._last_age_check >= AGE_CHECK_INTERVAL
        if not events and not age_check:
            return True
        size = self.settings.batch_size
        chunks = [events[i : i + size] for i in range(0, len(events), size)] or [[]]
        backoff = Backoff("redis", log)
        for i, chunk in enumerate(chunks):
            while True:
                try:
                    result = self.writer.apply(chunk, time.time(), age_check=age_check and i == 0)
                    backoff.recovered()
                    break
                except REDIS_ERRORS as exc:
                    backoff.failed(exc)
                    self.health.error("redis")
                    if self.stopping.wait(backoff.delay()):
                        return False
            newest = max((d.event.timestamp for d in chunk), default=0.0)
            self.health.batch(result.applied, result.duplicates, result.evicted, newest)
        if age_check:
            self._last_age_check = now
        return True

    def _flush_health(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.health is None or (not force and now - self._last_health < HEALTH_INTERVAL):
            return
        self._last_health = now
        try:
            self.health.flush(self.redis)
        except REDIS_ERRORS:
            log.debug("health not written (Redis unavailable)")


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"
