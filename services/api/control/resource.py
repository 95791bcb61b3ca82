"""What the control endpoints share: settings, Redis, the Celery app and the thread pool, made
with the app (``control_ctx``) and reached through ``request.app[CONTROL]``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from celery import Celery

from services.api.context import CONTEXT
from services.api.errors import ApiError, unavailable
from shared.broker import broker_errors, load_app
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("pollen.api.control")

T = TypeVar("T")

#: Seconds a control call waits for a free slot of its lane before answering 503.
QUEUE_WAIT = 5.0


@dataclass
class Control:
    """What the control endpoints share: settings, Redis, the Celery app and the thread pool."""

    settings: Settings
    redis: Any
    keys: Keys = field(init=False)
    app: Celery = field(init=False)
    executor: ThreadPoolExecutor = field(init=False)
    semaphore: asyncio.Semaphore = field(init=False)
    unverified: asyncio.Semaphore = field(init=False)
    errors: tuple[type[BaseException], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.namespace, self.settings.shards)
        self.app = load_app(self.settings, "pollen-api")
        # workers known only from events (anyone who can publish to the broker can forge
        # them) get a lane of their own, so calls that wait for them cannot starve the others
        unverified = max(1, self.settings.control_concurrency // 4)
        self.executor = ThreadPoolExecutor(
            max_workers=self.settings.control_concurrency + unverified,
            thread_name_prefix="control",
        )
        self.semaphore = asyncio.Semaphore(self.settings.control_concurrency)
        self.unverified = asyncio.Semaphore(unverified)
        errors = broker_errors(self.app)
        if self.has_backend:
            errors += tuple(getattr(self.app.backend, "connection_errors", ()) or ())
        self.errors = tuple(dict.fromkeys(errors))

    @property
    def has_backend(self) -> bool:
        """A result backend is configured (``POLLEN_RESULT_BACKEND`` or the Celery app's)."""
        return bool(self.app.conf.result_backend)

    @property
    def timeout(self) -> float:
        return self.settings.inspect_timeout

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking Celery call off the event loop; an outage is a 503."""
        return await self._run(self.semaphore, partial(fn, *args, **kwargs))

    async def run_unverified(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``run`` in the small lane of calls to workers known only from their events."""
        return await self._run(self.unverified, partial(fn, *args, **kwargs))

    async def _run(self, lane: asyncio.Semaphore, call: Callable[[], T]) -> T:
        try:
            await asyncio.wait_for(lane.acquire(), QUEUE_WAIT)
        except TimeoutError:
            raise ApiError(
                503, "too many control calls in progress: try again", {"Retry-After": "1"}
            ) from None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, call)
        except self.errors as exc:
            log.warning("broker or result backend unavailable: %r", exc)
            raise unavailable(f"broker or result backend unavailable: {exc}") from exc
        finally:
            lane.release()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        # kombu's connection pools are process-wide, keyed by broker URL: closing them would
        # break other apps on the same broker; celery's close() only drops the reference
        self.app.close()


CONTROL = web.AppKey("pollen.control", Control)


async def control_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the Control shares the app's settings and Redis client."""
    c = app[CONTEXT]
    control = Control(c.settings, c.redis)
    app[CONTROL] = control
    yield
    control.close()
