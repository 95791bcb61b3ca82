"""The security tests' stack, all real: a private redis-server (broker db 0, Pollen db 1,
results db 2), the collector and enabler, a prefork ``demo.app`` worker, and API processes in
each auth mode (open, basic auth, tokens and basic auth together). Attacks come from a real
Chromium (tests/dashboard's Playwright set-up) on pages served from other origins, and from
crafted HTTP requests."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings, load
from tests.support.api import Api
from tests.support.browser import CHROMIUM_ARGS, chromium_executable
from tests.support.servers import (
    Process,
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)

NAMESPACE = "secstack"
WORKER = "sec@pollen-test"
USER, PASSWORD = "alice", "wonder-land"
RO_USER, RO_PASSWORD = "bob", "read-only-pw"
TOKEN = "a-long-read-write-token"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Stack:
    redis: RedisServer
    broker_url: str
    env: dict[str, str]
    open_api: Api
    basic_api: Api
    both_api: Api
    workdir: Path
    processes: list[Process] = field(default_factory=list)

    def state_settings(self, namespace: str) -> Settings:
        """Settings of a Writer into Pollen's Redis under ``namespace``."""
        return load(
            {
                "POLLEN_REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/1",
                "POLLEN_NAMESPACE": namespace,
            }
        )

    def tasks_named(self, name: str) -> list[dict[str, Any]]:
        """Every task of ``name`` Pollen knows (through the open API, as a script would)."""
        with urllib.request.urlopen(
            f"{self.open_api.url}/api/tasks?taskname={name}&limit=1000", timeout=10
        ) as resp:
            return list(json.loads(resp.read()).values())

    def audit(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.open_api.url}/api/audit", timeout=10) as resp:
            entries: list[dict[str, Any]] = json.loads(resp.read())["entries"]
            return entries


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("security")
    server = RedisServer(workdir / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    env = pollen_env(
        broker,
        f"redis://127.0.0.1:{server.port}/1",
        NAMESPACE,
        result_backend=f"redis://127.0.0.1:{server.port}/2",
        enable_interval="2",
        inspect_interval="3",
        # generous: a loaded worker answers a control call late, not never (504 is for never)
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
                pool="prefork",
                concurrency=2,
                env={"DEMO_RESULT_BACKEND": f"redis://127.0.0.1:{server.port}/2"},
            )
        )
        apis.append(Api(env, workdir / "api-open.log"))
        apis.append(
            Api(
                env,
                workdir / "api-basic.log",
                POLLEN_BASIC_AUTH=f"{USER}:{PASSWORD},{RO_USER}:{RO_PASSWORD}:ro",
                POLLEN_OPEN_HEALTH="1",
            )
        )
        apis.append(
            Api(
                env,
                workdir / "api-both.log",
                POLLEN_BASIC_AUTH=f"{USER}:{PASSWORD}",
                POLLEN_API_TOKENS=TOKEN,
            )
        )
        stack = Stack(server, broker, env, apis[0], apis[1], apis[2], workdir, processes)
        wait_for(
            lambda: (
                stack.open_api.data(f"/api/workers?workername={WORKER}")
                .get(WORKER, {})
                .get("stats")
            ),
            timeout=60,
            message="the worker's inspect data",
        )
        yield stack
    finally:
        for p in reversed(processes):
            p.stop()
        for a in apis:
            a.stop()
        server.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Debian's Chromium through Playwright; each test opens its own context (credentials)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=chromium_executable(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield b
        finally:
            b.close()
