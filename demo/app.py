"""The demo Celery app: tasks that succeed, fail, retry, run long, get rejected or revoked.

Used by `make run` and by the tests, which start real workers with
``celery -A demo.app worker``. The broker comes from ``POLLEN_BROKER_URL`` like Pollen's.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from celery import Celery, Task
from celery.contrib.abortable import AbortableTask
from celery.exceptions import Reject

app = Celery("demo", broker=os.environ.get("POLLEN_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    result_backend=os.environ.get("DEMO_RESULT_BACKEND") or None,
    task_send_sent_event=True,
    worker_send_task_events=True,
    task_acks_late=False,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    task_default_priority=None,
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task
def fail(message: str = "boom") -> None:
    raise ValueError(message)


class DemoError(Exception):
    """An exception class of the app's own (the failures view groups by class)."""


#: What ``fail_as`` raises, by name.
FAILURES: dict[str, type[Exception]] = {
    "KeyError": KeyError,
    "ZeroDivisionError": ZeroDivisionError,
    "TimeoutError": TimeoutError,
    "DemoError": DemoError,
}


@app.task
def fail_as(kind: str, message: str = "boom") -> None:
    raise FAILURES[kind](message)


@app.task(bind=True, max_retries=2, default_retry_delay=0.2)
def flaky(self: Task, succeed_on: int = 2) -> str:
    if self.request.retries < succeed_on:
        raise self.retry(exc=RuntimeError(f"attempt {self.request.retries}"))
    return f"ok after {self.request.retries} retries"


@app.task
def slow(seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return seconds


@app.task(bind=True)
def hang_on(self: Task, hostname: str, seconds: float = 300.0) -> str:
    """Runs long on ``hostname`` and at once elsewhere: a task a worker dies with and another
    one finishes."""
    if self.request.hostname == hostname:
        time.sleep(seconds)
    return str(self.request.hostname)


@app.task(acks_late=True)
def reject() -> None:
    raise Reject("not today", requeue=False)


@app.task(bind=True)
def progress(self: Task, steps: int = 3) -> int:
    for step in range(steps):
        self.send_event("task-progress", current=step, total=steps)
        time.sleep(0.05)
    return steps


@app.task
def random_work() -> Any:
    """A task whose outcome varies, for dashboards to look alive."""
    roll = random.random()
    if roll < 0.1:
        raise KeyError("unlucky")
    time.sleep(random.random() * 0.5)
    return round(roll, 3)


# --- for the enabler/control tests -------------------------------------------------------------
# DEMO_TASK_EVENTS=0 starts workers with task events off, as a worker without -E, so a test can
# see the enabler's enable_events broadcast turn them on.
if os.environ.get("DEMO_TASK_EVENTS") == "0":
    app.conf.worker_send_task_events = False


@app.task(bind=True, base=AbortableTask)
def abortable(self: AbortableTask, seconds: float = 30.0) -> str:
    """Runs until aborted (through the result backend) or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if self.is_aborted():
            return "aborted"
        time.sleep(0.1)
    return "done"
