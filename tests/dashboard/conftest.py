"""Browser tests of the dashboard: Debian's Chromium driven by Playwright against a real stack.

The stack is made of real parts: a private redis-server (broker on db 0, Pollen on db 1), a
real ``celery -A demo.app worker`` (prefork, so pool control works), demo traffic, and the
collector, enabler and API processes (one API replica normal, one read-only). Screenshots of
each view go to ``.run/screenshots/`` (``make screenshots``: ``docs/screenshots/``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import Api
from tests.support.browser import CHROMIUM_ARGS, chromium_executable
from tests.support.servers import (
    PYTHON,
    ROOT,
    Process,
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)

#: Where the test run saves a screenshot of each view; `make screenshots` points this at
#: docs/screenshots/ (the README's), a plain `make test` leaves the tracked ones alone.
SCREENSHOTS = Path(os.environ.get("SCREENSHOTS_DIR") or ROOT / ".run" / "screenshots")
NAMESPACE = "dash"
WORKER = "dash@pollen-demo"
#: A queue no worker consumes at first, so the queue chart has something waiting.
IDLE_QUEUE = "reports"


@dataclass
class Stack:
    redis: RedisServer
    broker_url: str
    env: dict[str, str]
    api: Api
    read_only: Api
    workdir: Path
    processes: list[Process] = field(default_factory=list)

    def send(self, name: str, *args: Any, queue: str | None = None, **kwargs: Any) -> str:
        """Send a demo task through the broker, as a Celery client does; its id."""
        from demo.traffic import client

        app = client(self.broker_url)
        try:
            options: dict[str, Any] = {"queue": queue} if queue else {}
            return str(app.send_task(name, args, kwargs, **options).id)
        finally:
            app.close()


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("dashboard")
    server = RedisServer(workdir / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    state = f"redis://127.0.0.1:{server.port}/1"
    env = pollen_env(
        broker,
        state,
        NAMESPACE,
        inspect_interval="5",
        queue_interval="2",
        queues=f"celery,{IDLE_QUEUE}",
        alert_interval="1",
        enable_interval="2",
        # generous: under load a worker answers a control call late, not never (504 is for never)
        inspect_timeout="10",
    )
    processes: list[Process] = []
    apis: list[Api] = []
    try:
        processes.append(service("collector", env, workdir / "collector.log"))
        processes.append(service("enabler", env, workdir / "enabler.log"))
        processes.append(
            celery_worker(
                broker,
                workdir / "worker.log",
                WORKER,
                "--pool",
                "prefork",
                "--concurrency",
                "3",
                "--queues",
                "celery",
            )
        )
        apis.append(Api(env, workdir / "api.log"))
        apis.append(Api(env, workdir / "api-ro.log", POLLEN_READ_ONLY="1"))
        processes.append(
            Process(
                [PYTHON, "-m", "demo.traffic", "--rate", "6"],
                workdir / "traffic.log",
                {"POLLEN_BROKER_URL": broker},
            )
        )
        stack = Stack(server, broker, env, apis[0], apis[1], workdir, processes)
        for _ in range(12):
            stack.send("demo.app.add", 1, 2, queue=IDLE_QUEUE)
        api = apis[0]
        wait_for(
            lambda: api.data("/api/workers?status=1").get(WORKER),
            timeout=60,
            message="the worker online",
        )
        wait_for(
            lambda: (
                api.data("/api/tasks?state=FAILURE&limit=1")
                and len(api.data("/api/tasks?state=SUCCESS&limit=20")) >= 20
            ),
            timeout=90,
            message="successes and failures in /api/tasks",
        )
        wait_for(
            lambda: "registered" in api.data(f"/api/workers?workername={WORKER}")[WORKER],
            timeout=60,
            message="inspect data of the worker",
        )
        yield stack
    finally:
        for p in reversed(processes):
            p.stop()
        for a in apis:
            a.stop()
        server.stop()


@pytest.fixture(scope="package")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    executable = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run .ci/run (or make install)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 900},
            timezone_id="Europe/Berlin",
            locale="en-GB",
        )
        try:
            yield context
        finally:
            context.close()


class Console:
    """Console errors and uncaught page errors of one page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    page = browser_context.new_page()
    page.console = Console(page)
    yield page
    page.close()


def screenshot(page: Any, name: str, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)
