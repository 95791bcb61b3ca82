"""The collector's loop: fetch a batch, decode it, commit it to Redis, then acknowledge it.

A batch is acknowledged only after Redis has it, so on RabbitMQ nothing is lost when the
collector or Redis fails: unacknowledged events are redelivered, and applying an event twice
changes nothing. Outages of Redis or of the broker are waited out with capped backoff.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from services.collector.decode import Decoded, Decoder
from services.collector.sources import AmqpSource, Incoming, Source, open_source
from services.collector.status import Status
from services.collector.writer import Prepared, Writer
from shared.backoff import Backoff
from shared.broker import load_app, shown_url
from shared.connections import REDIS_ERRORS, config_advice, sync_client
from shared.keys import Keys
from shared.redaction import Redactor
from shared.settings import Settings, mask_url

log = logging.getLogger("pollen.collector")

HEALTH_INTERVAL = 1.0
AGE_CHECK_INTERVAL = 1.0


@dataclass(slots=True)
class _Job:
    """Messages fetched together and the script calls that commit their events."""

    messages: list[Incoming]
    prepared: list[Prepared]


class Collector:
    def __init__(self, settings: Settings, app: Celery | None = None, client: Any = None) -> None:
        self.settings = settings
        self.app = app if app is not None else load_app(settings, "pollen-collector")
        self.keys = Keys(settings.namespace, settings.shards)
        self.redis = client if client is not None else sync_client(settings)
        self.writer = Writer(self.redis, settings)
        self.decoder = Decoder(
            settings.max_field_bytes,
            Redactor.from_settings(settings.redact_keys, settings.redact_fields),
        )
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        self.source: Source | None = None
        self.status: Status | None = None
        self._last_age_check = 0.0
        self._last_health = 0.0

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        settings = self.settings
        source = open_source(
            self.app,
            settings.event_queue,
            settings.event_queue_expires,
            prefetch=settings.batch_size,
        )
        self.source = source
        self.status = status = Status(self.keys, self.id, source.name)
        log.info(
            "collector %s consuming from %s (%s%s) into %s, namespace %r, %d shard(s)",
            self.id,
            shown_url(self.app),
            source.name,
            f", queue {settings.event_queue!r}" if settings.event_queue else "",
            mask_url(settings.redis_url),
            settings.namespace,
            settings.shards,
        )
        for advice in config_advice(self.redis):
            log.warning("Redis: %s, so tasks take more memory (docs/operations.md)", advice)
        broker = Backoff("broker", log)
        broker_errors: tuple[type[BaseException], ...] = (OSError, ConnectionError)
        if isinstance(source, AmqpSource):
            broker_errors = source.connection_errors
        # The writer thread runs the Redis scripts of one batch while this thread fetches,
        # decodes and prepares the next; acknowledgements stay on this (the broker's) thread.
        pending: queue.Queue[_Job | None] = queue.Queue(maxsize=2)
        done: queue.Queue[_Job] = queue.Queue()
        writer = threading.Thread(target=self._write, args=(pending, done), name="writer")
        writer.start()
        try:
            while not self.stopping.is_set():
                try:
                    batch = source.fetch(settings.batch_size, settings.batch_interval)
                    broker.recovered()
                except broker_errors as exc:
                    broker.failed(exc)
                    status.error("broker")
                    source.close()
                    self.stopping.wait(broker.delay())
                    continue
                status.dropped = getattr(source, "dropped", 0)
                job = self._prepare(batch)
                if job is not None:
                    while not self.stopping.is_set():
                        try:
                            pending.put(job, timeout=0.2)
                            break
                        except queue.Full:
                            self._ack_done(done, source, broker_errors, broker)
                self._ack_done(done, source, broker_errors, broker)
                self._flush_health()
        finally:
            pending.put(None)
            writer.join()
            self._ack_done(done, source, broker_errors, broker)
            source.close()
            self._flush_health(force=True)
            log.info("collector %s stopped", self.id)

    def _prepare(self, batch: list[Incoming]) -> _Job | None:
        """Decode and prepare a batch; None when there is nothing to do."""
        events = self._decode(batch)
        now = time.time()
        age_check = now - self._last_age_check >= AGE_CHECK_INTERVAL
        if age_check:
            self._last_age_check = now
        if not events and not age_check:
            return _Job(batch, []) if batch else None
        size = self.settings.batch_size
        chunks = [events[i : i + size] for i in range(0, len(events), size)] or [[]]
        prepared = [
            self.writer.prepare(chunk, now, age_check=age_check and i == 0)
            for i, chunk in enumerate(chunks)
        ]
        return _Job(batch, prepared)

    def _write(self, pending: queue.Queue[_Job | None], done: queue.Queue[_Job]) -> None:
        """Writer thread: run each job's scripts until Redis takes them, in order."""
        assert self.status is not None
        backoff = Backoff("redis", log)
        while (job := pending.get()) is not None:
            for prepared in job.prepared:
                while True:
                    try:
                        result = self.writer.execute(prepared)
                        backoff.recovered()
                        break
                    except REDIS_ERRORS as exc:
                        backoff.failed(exc)
                        self.status.error("redis")
                        if self.stopping.wait(backoff.delay()):
                            return  # stopping during an outage: leave the rest unacknowledged
                self.status.batch(
                    result.applied, result.duplicates, result.evicted, prepared.newest
                )
            done.put(job)

    def _ack_done(
        self,
        done: queue.Queue[_Job],
        source: Source,
        broker_errors: tuple[type[BaseException], ...],
        broker: Backoff,
    ) -> None:
        """Acknowledge the batches Redis has taken (on the broker's thread)."""
        assert self.status is not None
        while True:
            try:
                job = done.get_nowait()
            except queue.Empty:
                return
            try:
                source.ack(job.messages)
            except broker_errors as exc:
                # the batch is in Redis; the broker will redeliver it, and a redelivered
                # event is recognised and skipped
                broker.failed(exc)
                self.status.error("broker")
                source.close()

    def _decode(self, batch: list[Incoming]) -> list[Decoded]:
        assert self.status is not None
        events: list[Decoded] = []
        for message in batch:
            result = self.decoder.decode(
                message.body, message.content_type, message.content_encoding, message.received
            )
            events.extend(result.events)
            for bad in result.bad:
                self.status.bad(bad.reason, bad.sample)
            if result.truncated:
                self.status.truncated(result.truncated)
        return events

    def _flush_health(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.status is None or (not force and now - self._last_health < HEALTH_INTERVAL):
            return
        self._last_health = now
        try:
            self.status.flush(self.redis)
        except REDIS_ERRORS:
            log.debug("health not written (Redis unavailable)")
