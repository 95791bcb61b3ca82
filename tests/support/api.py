"""The API as the tests run it: a real ``pollen-api`` process with a small blocking client,
and the state it serves written through the collector's own write path."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from services.collector.writer import Writer
from shared.settings import Settings, load
from tests.support import readback
from tests.support.servers import Process, RedisServer, free_port, service, wait_for


class Api:
    """A running API process (``env`` plus ``extra`` settings, on a free port of 127.0.0.1)
    and a tiny blocking HTTP client for it."""

    def __init__(self, env: dict[str, str], log: Path, **extra: str) -> None:
        self.port = free_port()
        self.env = {"POLLEN_API_PORT": str(self.port), "POLLEN_API_HOST": "127.0.0.1"}
        self.env.update(env)
        self.env.update(extra)
        self.log = log
        self.start()

    def start(self) -> Api:
        """Start the process (again, after ``kill``) and wait until it answers."""
        self.process: Process = service("api", self.env, self.log)
        try:
            wait_for(self._up, timeout=20, message=f"API on port {self.port}")
        except BaseException:
            self.process.stop()  # nobody else holds it yet: it would outlive the tests
            raise
        return self

    def _up(self) -> bool:
        if not self.process.alive():
            raise RuntimeError(f"API exited:\n{self.process.output()}")
        prefix = self.env.get("POLLEN_URL_PREFIX", "").strip("/")
        try:
            status = self.request("GET", f"/{prefix}/healthz" if prefix else "/healthz")[0]
        except OSError:
            return False
        return status in (200, 401)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 30
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, headers)

    def json(self, path: str, headers: dict[str, str] | None = None) -> Any:
        """A 200 answer's JSON with objects as lists of pairs (their order is checked)."""
        status, _, body = self.get(path, headers)
        assert status == 200, (path, status, body[:500])
        return json.loads(body, object_pairs_hook=list)

    def data(self, path: str) -> Any:
        """A 2xx answer's JSON (urllib: anything else raises ``HTTPError``)."""
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def kill(self) -> None:
        self.process.signal(signal.SIGKILL)
        self.process.proc.wait(10)

    def stop(self) -> None:
        self.process.stop()


def api_env(server: RedisServer, namespace: str, **settings: str) -> dict[str, str]:
    env = {
        "POLLEN_REDIS_URL": server.url,
        "POLLEN_NAMESPACE": namespace,
        "POLLEN_LOG_LEVEL": "INFO",
    }
    env.update({f"POLLEN_{k.upper()}": v for k, v in settings.items()})
    return env


def seed(
    server: RedisServer,
    namespace: str,
    events: list[dict[str, Any]],
    shards: int = 1,
    batch: int = 500,
    **overrides: str,
) -> None:
    """Write ``events`` through the collector's write path (``Writer``), in batches."""
    env = {
        "POLLEN_REDIS_URL": server.url,
        "POLLEN_NAMESPACE": namespace,
        "POLLEN_SHARDS": str(shards),
    }
    env.update({f"POLLEN_{k.upper()}": v for k, v in overrides.items()})
    settings: Settings = load(env)
    client = redis.Redis(port=server.port)
    try:
        writer = Writer(client, settings)
        for i in range(0, len(events), batch):
            readback.apply(writer, events[i : i + batch], now=time.time())
    finally:
        client.close()


def clear_namespace(server: RedisServer, namespace: str) -> None:
    client = redis.Redis(port=server.port)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    finally:
        client.close()
