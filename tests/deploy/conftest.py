"""Real deployments as users run them: their own Celery app module, read by the worker and by
every Pollen console script through ``-A``; brokers and Pollen's Redis over TLS with
certificates made here (a CA, a server and a client certificate), a private RabbitMQ node
that only speaks TLS and demands a client certificate, Redis Sentinel with a replica.

Everything is Debian's real servers: ``openssl``, ``redis-server`` (also as a sentinel) and
``rabbitmq-server``, each on free ports in the test's own directories, stopped afterwards.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.servers import PYTHON, Process, RabbitNode, RedisServer, free_port, wait_for

BIN = Path(PYTHON).parent


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="package")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throw-away CA, a server certificate for localhost/127.0.0.1 and a client one."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run .ci/run (Debian's openssl package)")
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=pollen-test-ca", cwd=d,
    )  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN=pollen-test-{name}", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d,
        )  # fmt: skip
    for key in d.glob("*.key"):
        key.chmod(0o644)  # readable by the servers' users
    return Certs(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )


def tls_redis(workdir: Path, certs: Certs) -> RedisServer:
    """A redis-server that speaks only TLS and demands a client certificate."""
    port = free_port()
    return RedisServer(
        workdir,
        port,
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes",
        client={
            "ssl": True,
            "ssl_ca_certs": str(certs.ca),
            "ssl_certfile": str(certs.client_cert),
            "ssl_keyfile": str(certs.client_key),
        },
    )  # fmt: skip


@pytest.fixture(scope="package")
def rabbit_tls(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[RabbitNode]:
    tls = textwrap.dedent(f"""\
        ssl_options.cacertfile = {certs.ca}
        ssl_options.certfile = {certs.server_cert}
        ssl_options.keyfile = {certs.server_key}
        ssl_options.verify = verify_peer
        ssl_options.fail_if_no_peer_cert = true
        """)
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"), tls=tls).start()
    try:
        yield node
    finally:
        node.stop()


class Sentinel:
    """A redis-server sentinel watching ``master`` as ``name`` (quorum 1, quick to act)."""

    def __init__(
        self, workdir: Path, master: RedisServer, name: str = "pollenmaster", replicas: int = 1
    ) -> None:
        self.workdir = workdir
        self.replicas = replicas
        self.port = free_port()
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "sentinel.conf"
        self.config.write_text(
            textwrap.dedent(f"""\
                port {self.port}
                bind 127.0.0.1
                dir {workdir}
                logfile {workdir / "sentinel.log"}
                sentinel monitor {name} 127.0.0.1 {master.port} 1
                sentinel down-after-milliseconds {name} 1000
                sentinel failover-timeout {name} 10000
                """)
        )
        self.process: Process | None = None

    def start(self) -> Sentinel:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = Process(
            [server, str(self.config), "--sentinel"], self.workdir / "out.log", cwd=self.workdir
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            wait_for(
                lambda: int(self._master(client)["num-slaves"]) >= self.replicas,
                timeout=30,
                message="the sentinel to see the master and its replicas",
            )
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
        return self

    def _master(self, client: redis.Redis) -> dict[str, Any]:
        found = client.sentinel_master(self.name)
        assert isinstance(found, dict), found
        return found

    def master_port(self) -> int:
        """The port of the master the sentinel names now."""
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            return int(self._master(client)["port"])
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class Deployment:
    """A user's project directory (their app module) with a worker and Pollen's three
    console scripts started in it with ``-A``."""

    workdir: Path
    module: str
    env: dict[str, str]
    worker_name: str = "deploy@pollen-test"
    api_port: int = field(default_factory=free_port)
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def app(self) -> Any:
        """The user's app, imported as their own client code would."""
        import importlib
        import sys

        sys.path.insert(0, str(self.workdir))
        try:
            return importlib.import_module(self.module).app
        finally:
            sys.path.remove(str(self.workdir))

    def start(self, *services: str) -> None:
        env = {
            **self.env,
            "POLLEN_API_PORT": str(self.api_port),
            "POLLEN_LOG_LEVEL": "INFO",
            # nothing from the developer's environment: only -A and what this test sets
            "PYTHONPATH": "",
        }
        for name in services or ("worker", "collector", "enabler", "api"):
            if name == "worker":
                args = [
                    str(BIN / "celery"), "-A", self.module, "worker", "--loglevel", "INFO",
                    "--hostname", self.worker_name, "--pool", "threads", "--concurrency", "2",
                    "--without-mingle", "--without-gossip",
                ]  # fmt: skip
            else:
                args = [str(BIN / f"pollen-{name}"), "-A", self.module]
            self.processes[name] = Process(
                args, self.workdir / f"{name}.log", env, cwd=self.workdir
            )
        if "api" in self.processes:
            wait_for(self._api_up, timeout=30, message="the API")

    def _api_up(self) -> bool:
        process = self.processes["api"]
        if not process.alive():
            raise RuntimeError(f"pollen-api exited:\n{process.output()}")
        with urllib.request.urlopen(self.api + "/healthz", timeout=2) as resp:
            return bool(resp.status == 200)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.api + path, timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(
            self.api + path, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=15) as resp:
            return json.loads(resp.read())

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-4000:]}" for n, p in self.processes.items())

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()
        self.processes.clear()

    def kill(self, name: str) -> None:
        self.processes[name].signal(signal.SIGKILL)


def write_project(workdir: Path, module: str, config: str) -> None:
    """The user's ``<module>.py``: a Celery app configured by ``config`` (Python source run
    with ``app``, ``os`` and ``ssl`` in scope) and a few tasks."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = textwrap.dedent("""\
        import os
        import ssl
        import time

        from celery import Celery

        app = Celery({module!r})
        app.conf.update(
            worker_send_task_events=True,
            task_send_sent_event=True,
            broker_connection_retry_on_startup=True,
            result_backend=None,
        )
        {config}


        @app.task
        def add(x, y):
            return x + y


        @app.task
        def slow(seconds):
            time.sleep(seconds)
            return seconds
        """).format(module=module, config=textwrap.dedent(config).strip())
    (workdir / f"{module}.py").write_text(source)
