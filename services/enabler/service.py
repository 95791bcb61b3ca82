"""The enabler: keeps task events on, worker inspect data and queue lengths fresh in Redis.

Any number may run; an expiring lease in Redis (``enabler_lease.lua``) makes one active and
the others wait as standbys. The active one:

- broadcasts ``enable_events`` every ``POLLEN_ENABLE_INTERVAL`` (workers forget it on restart);
- inspects every worker every ``POLLEN_INSPECT_INTERVAL`` and stores each answer with its time,
  or the error when an expected worker (alive by its events) did not answer in time;
- reacts to ``worker-online`` on the ``<ns>:events`` channel with an immediate
  ``enable_events`` and an inspect of the new workers;
- samples queue lengths every ``POLLEN_QUEUE_INTERVAL`` and keeps a per-minute history;
- forgets offline workers (``retention.py``) and records the deaths of workers, which marks
  their unfinished tasks lost (``deaths.py``);
- evaluates the alert rules every ``POLLEN_ALERT_INTERVAL`` and delivers their alerts
  (``alerts.py``).

Broker or Redis outages are retried with capped backoff and logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import aiohttp
import msgspec
from celery import Celery
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from services.enabler import deaths, retention, writes
from services.enabler.alerts import Alerts
from services.enabler.queues import UNRESOLVED, QueueSampler, oldest
from shared import apply_events, scripts
from shared.backoff import Backoff
from shared.broker import broker_errors, load_app, shown_url
from shared.connections import REDIS_ERRORS, async_client
from shared.events import StreamEvent, published_events
from shared.inspected import INSPECT_METHODS
from shared.keys import Keys
from shared.settings import Settings, mask_url
from shared.workers import alive_workers

log = logging.getLogger("pollen.enabler")

T = TypeVar("T")

#: Hosts coming online within this many seconds are inspected together.
ONLINE_BATCH_WINDOW = 0.3
#: Attempts (one second apart) at a new worker's inspect answers: its control consumer may
#: start listening a moment after its worker-online event.
ONLINE_ATTEMPTS = 3
#: Seconds a forgotten worker gets no "no answer" inspect entry (an inspect call, online
#: retries included, that began before the purge ends well within this).
FORGOTTEN_KEPT = 120.0


class Enabler:
    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace, settings.shards)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.app = app if app is not None else load_app(settings, "pollen-enabler")
        self.executor = ThreadPoolExecutor(
            max_workers=2 * len(INSPECT_METHODS) + 2, thread_name_prefix="enabler"
        )
        # a pooled connection that died with an earlier outage fails once: retry it at once
        self.redis: Any = async_client(
            settings, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        )
        self.lease_script = scripts.register(self.redis, "enabler_lease")
        self.purge_script = scripts.register(self.redis, "purge_worker")
        self.apply_script = apply_events.register(self.redis)
        self.sampler = QueueSampler(settings, self.app)
        self.alerts = Alerts(self.redis, self.keys, settings)
        self.broker_errors = broker_errors(self.app)
        self.sample_errors: tuple[type[BaseException], ...] = (
            *self.broker_errors,
            aiohttp.ClientError,
        )
        self.broker_backoff = Backoff("broker", log, first=0.5, cap=10.0)
        self.redis_backoff = Backoff("Redis", log, first=0.5, cap=10.0)
        self.active = False
        self.wake_enable = asyncio.Event()
        self.wake_inspect = asyncio.Event()
        self.wake_queues = asyncio.Event()
        self.wake_online = asyncio.Event()
        self.wake_deaths = asyncio.Event()
        self.pending_online: set[str] = set()
        #: held while workers are forgotten, while inspect answers and deaths are stored
        self.forgetting = asyncio.Lock()
        #: hostname -> when retention forgot it (the last ``FORGOTTEN_KEPT`` seconds)
        self.forgotten: dict[str, float] = {}
        self.stopping = asyncio.Event()
        self.configured_queues = [q.strip() for q in settings.queues.split(",") if q.strip()]

    # --- plumbing ------------------------------------------------------------------------------

    async def blocking(self, fn: Callable[[], T]) -> T:
        """Run a blocking broker call in the thread pool; a broker error is retried once at
        once, since a pooled connection that died with an earlier outage fails once."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, fn)
        except self.broker_errors:
            return await loop.run_in_executor(self.executor, fn)

    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    async def _every(
        self,
        wake: asyncio.Event,
        interval: Callable[[], float],
        step: Callable[[], Awaitable[object]],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        """``step`` every ``interval()`` seconds while active, at once when ``wake`` is set;
        after a failure (``errors``, or Redis's) at the broker's backoff instead. ``step``
        keeps the broker's backoff itself (it knows which of its errors are the broker's)."""
        ok = True
        while True:
            await self._wait(wake, interval() if ok else self.broker_backoff.delay())
            if not self.active:
                continue
            try:
                await step()
                ok = True
            except errors:
                ok = False
            except REDIS_ERRORS as exc:
                ok = False
                self.redis_backoff.failed(exc)

    def _wake_all(self) -> None:
        for event in (self.wake_enable, self.wake_inspect, self.wake_queues):
            event.set()

    def _set_active(self, held: bool, holder: str) -> None:
        if held and not self.active:
            log.info("enabler %s is active", self.id)
            self.active = True
            self._wake_all()
        elif not held and self.active:
            log.info("enabler %s is standby (lease held by %s)", self.id, holder or "nobody")
            self.active = False
        elif not held and not self.active and holder:
            log.debug("standby, lease held by %s", holder)

    # --- lease ---------------------------------------------------------------------------------

    async def hold_lease(self) -> bool:
        """Take or renew the lease; returns whether this enabler holds it."""
        ttl_ms = max(1, int(self.settings.enable_interval * 1500))
        held, holder, _ = await self.lease_script(
            keys=[self.keys.enabler_lease], args=[self.id, ttl_ms, "hold"]
        )
        holder_text = holder.decode() if isinstance(holder, bytes) else str(holder)
        self._set_active(bool(held), holder_text)
        return bool(held)

    async def release_lease(self) -> None:
        await self.lease_script(keys=[self.keys.enabler_lease], args=[self.id, 0, "release"])
        self.active = False

    async def lease_loop(self) -> None:
        period = self.settings.enable_interval / 3
        while True:
            try:
                await self.hold_lease()
                self.redis_backoff.recovered()
                await asyncio.sleep(period)
            except REDIS_ERRORS as exc:
                # without Redis nothing can be stored and the lease cannot be confirmed
                self.redis_backoff.failed(exc)
                self._set_active(False, "")
                await asyncio.sleep(min(period, self.redis_backoff.delay()))

    # --- enable_events -------------------------------------------------------------------------

    async def enable_events(self) -> bool:
        try:
            await self.blocking(self.app.control.enable_events)
        except self.broker_errors as exc:
            self.broker_backoff.failed(exc)
            return False
        self.broker_backoff.recovered()
        return True

    async def enable_loop(self) -> None:
        ok = True
        while True:
            interval = self.settings.enable_interval
            await self._wait(self.wake_enable, interval if ok else self.broker_backoff.delay())
            if self.active:
                ok = await self.enable_events()

    # --- inspect -------------------------------------------------------------------------------

    def _inspect_call(self, method: str, destination: list[str] | None) -> Any:
        inspect = self.app.control.inspect(
            timeout=self.settings.inspect_timeout, destination=destination
        )
        fn = getattr(inspect, method)
        return fn(safe=True) if method == "active" else fn()

    async def inspect(
        self, destination: list[str] | None = None, methods: Iterable[str] = INSPECT_METHODS
    ) -> dict[str, set[str]]:
        """Run the inspect ``methods`` (all workers, or ``destination``) and store the answers.

        Returns ``{method: hosts expected that did not answer}``; empty sets when all did.
        Broker and Redis errors propagate once every method has been tried.
        """
        methods = list(methods)
        if destination is None:
            expected = await alive_workers(self.redis, self.keys, time.time())
        else:
            expected = set(destination)
        results = await asyncio.gather(
            *(self.blocking(partial(self._inspect_call, m, destination)) for m in methods),
            return_exceptions=True,
        )
        missing: dict[str, set[str]] = {}
        broker_failure: BaseException | None = None
        async with self.forgetting:
            # a worker forgotten lately gets no "no answer" entry: that would bring back the
            # inspect key retention just removed
            expected -= set(self.forgotten)
            for method, result in zip(methods, results, strict=True):
                if isinstance(result, self.broker_errors):
                    broker_failure = result
                    continue
                if isinstance(result, BaseException):
                    log.error("inspect %s failed: %r", method, result)
                    continue
                answers = {str(k): v for k, v in (result or {}).items() if v is not None}
                await writes.store_answers(
                    self.redis,
                    self.keys,
                    method,
                    answers,
                    expected,
                    self.settings.inspect_timeout,
                    self.settings.inspect_ttl,
                )
                missing[method] = expected - set(answers)
        if broker_failure is not None:
            raise broker_failure
        return missing

    async def inspect_all(self) -> None:
        """``inspect`` every worker, the broker's backoff kept."""
        try:
            await self.inspect()
        except self.broker_errors as exc:
            self.broker_backoff.failed(exc)
            raise
        self.broker_backoff.recovered()

    async def inspect_loop(self) -> None:
        await self._every(
            self.wake_inspect,
            lambda: self.settings.inspect_interval,
            self.inspect_all,
            self.broker_errors,
        )

    # --- workers coming online -----------------------------------------------------------------

    def worker_online(self, hostname: str) -> None:
        if hostname:
            self.pending_online.add(hostname)
            self.wake_online.set()

    async def online_loop(self) -> None:
        while True:
            await self.wake_online.wait()
            await asyncio.sleep(ONLINE_BATCH_WINDOW)
            self.wake_online.clear()
            hosts, self.pending_online = sorted(self.pending_online), set()
            if not self.active or not hosts:
                continue
            log.info("worker(s) online: %s; enabling events and inspecting", ", ".join(hosts))
            await self.enable_events()
            methods = list(INSPECT_METHODS)
            for attempt in range(ONLINE_ATTEMPTS):
                try:
                    missing = await self.inspect(hosts, methods)
                except self.broker_errors as exc:
                    self.broker_backoff.failed(exc)
                    break
                except REDIS_ERRORS as exc:
                    self.redis_backoff.failed(exc)
                    break
                methods = [m for m in methods if missing.get(m, set(hosts))]
                still = sorted(set().union(*(missing.get(m, set()) for m in methods)))
                if not methods or not still or attempt == ONLINE_ATTEMPTS - 1:
                    break
                hosts = still
                await asyncio.sleep(1.0)
                # a worker whose control consumer was not listening yet missed the first one too
                await self.enable_events()

    async def listen_loop(self) -> None:
        """Subscribe to ``<ns>:events`` and pass on every worker-online."""
        # its outages are the Redis outages the other loops report: only its delay is its own
        quiet = logging.getLogger("pollen.enabler.pubsub")
        quiet.setLevel(logging.ERROR)
        backoff = Backoff("Redis pub/sub", quiet, first=0.5, cap=10.0)
        decoder = msgspec.json.Decoder(StreamEvent)
        while True:
            client = async_client(
                self.settings, plain=True, socket_timeout=10, socket_connect_timeout=2
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.events_channel)
                backoff.recovered()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    for raw in published_events(message["data"]):
                        try:
                            event = decoder.decode(raw)
                        except msgspec.DecodeError:
                            continue
                        if event.type == "worker-online":
                            self.worker_online(event.hostname)
                        if event.type in ("worker-online", "worker-offline"):
                            self.wake_deaths.set()
            except REDIS_ERRORS as exc:
                backoff.failed(exc)
                self.redis_backoff.failed(exc)
                await asyncio.sleep(backoff.delay())
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()

    # --- queue lengths -------------------------------------------------------------------------

    async def queue_names(self) -> list[str]:
        names = set(self.configured_queues)
        names |= await writes.inspected_queue_names(self.redis, self.keys)
        # as Flower: the default queue when nothing tells which queues exist
        return sorted(names) or ["celery"]

    async def sample_queues(self) -> None:
        names = await self.queue_names()
        try:
            samples = await self.sampler.sample(names)
        except self.sample_errors as exc:
            self.broker_backoff.failed(exc)
            raise
        await self.resolve_oldest(samples)
        await writes.store_queues(self.redis, self.keys, samples, self.settings.queue_history)

    async def resolve_oldest(self, samples: list[dict[str, Any]]) -> None:
        """The oldest message of Redis queues whose messages carry no timestamp: the one whose
        task-sent Pollen saw first (null when it saw none: clients without task-sent events)."""
        ids = [i for s in samples for i in s.get(UNRESOLVED, ())]
        sent = await writes.sent_times(self.redis, self.keys, ids) if ids else {}
        for sample in samples:
            heads = sample.pop(UNRESOLVED, None)
            if not heads:
                continue
            known = [(sent[i], i) for i in heads if i in sent]
            if known:
                since, task_id = min(known)
                sample["oldest"] = oldest(task_id, since, sample["time"])
            else:
                sample["oldest"] = oldest(heads[-1], None, sample["time"])

    async def queue_loop(self) -> None:
        if not self.sampler.supported:
            log.warning(
                "queue lengths: broker transport %r is not supported", self.sampler.transport
            )
            await self.stopping.wait()
            return
        await self._every(
            self.wake_queues,
            lambda: self.settings.queue_interval,
            self.sample_queues,
            self.sample_errors,
        )

    # --- worker retention ----------------------------------------------------------------------

    async def forget_offline_workers(self) -> None:
        async with self.forgetting:
            now = time.time()
            self.forgotten = {h: t for h, t in self.forgotten.items() if t > now - FORGOTTEN_KEPT}
            purged = await retention.purge_offline(
                self.redis,
                self.keys,
                self.purge_script,
                self.settings.offline_worker_ttl,
                self.settings.max_workers,
                self.settings.inspect_timeout,
            )
            self.forgotten.update(dict.fromkeys(purged, now))

    async def retention_loop(self) -> None:
        await self._every(
            asyncio.Event(),
            lambda: retention.interval(self.settings.offline_worker_ttl),
            self.forget_offline_workers,
            (),
        )

    # --- deaths and lost tasks ---------------------------------------------------------------

    async def death_loop(self) -> None:
        """Record worker deaths (``deaths.py``) while active, at the pace of the heartbeats and
        at once on a worker-offline or worker-online."""
        while True:
            due = time.time() + deaths.MOST_WAIT
            if self.active:
                try:
                    async with self.forgetting:
                        _, due = await deaths.record_deaths(
                            self.redis, self.keys, self.settings, self.apply_script, time.time()
                        )
                except REDIS_ERRORS as exc:
                    self.redis_backoff.failed(exc)
                    due = time.time() + self.redis_backoff.delay()
            await self._wait(self.wake_deaths, max(0.0, due - time.time()))

    # --- alerts --------------------------------------------------------------------------------

    async def alert_loop(self) -> None:
        await self._every(
            asyncio.Event(), lambda: self.settings.alert_interval, self.alerts.evaluate, ()
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        log.info(
            "enabler %s starting: broker %s, redis %s, namespace %s",
            self.id,
            shown_url(self.app),
            mask_url(self.settings.redis_url),
            self.settings.namespace,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stopping.set)
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._supervised(loop_fn), name=loop_fn.__name__)
            for loop_fn in (
                self.lease_loop,
                self.listen_loop,
                self.enable_loop,
                self.inspect_loop,
                self.online_loop,
                self.queue_loop,
                self.retention_loop,
                self.death_loop,
                self.alert_loop,
            )
        ]
        stop: asyncio.Task[Any] = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop.cancel()
        crashed = [t for t in done if t is not stop and not t.cancelled() and t.exception()]
        await self.close()
        for task in crashed:
            raise task.exception() or RuntimeError(task.get_name())
        log.info("enabler %s stopped", self.id)

    @staticmethod
    async def _supervised(loop_fn: Callable[[], Awaitable[None]]) -> None:
        """Run a loop; an unexpected error (a bug, an odd reply) is logged with its traceback
        and the loop restarted, so one failing duty does not stop the others."""
        while True:
            try:
                await loop_fn()
                return
            except Exception:
                log.exception("%s failed; restarting it in 1 s", loop_fn.__name__)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.release_lease()
        await self.sampler.close()
        await self.alerts.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)
