"""Real servers for the tests: private redis-servers, RabbitMQ vhosts and nodes, service
processes, nginx.

Nothing here stands in for Redis, RabbitMQ or Celery; it starts and stops the real things.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from shared.connections import redis_server_args

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> object:
    """Poll ``predicate`` until it returns something true; ``message`` (or what it returns,
    called when the time is up: logs as they are then) says what was awaited."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the server may not be up yet
            last_exc = exc
        time.sleep(interval)
    said = message() if callable(message) else message
    raise TimeoutError(f"timed out waiting for {said}" + (f": {last_exc!r}" if last_exc else ""))


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(found):
        raise RuntimeError(
            "redis-server is not installed: run .ci/run or `apt-get install redis-server`"
        )
    return found


class RedisServer:
    """A redis-server on a free port in its own directory; kill() and start() for fault tests."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *extra: str,
        client: dict[str, object] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = list(extra)
        #: how to reach it (a TLS server: ``ssl=True`` and certificates)
        self.client = client or {}
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.workdir / "redis.log"),
            *redis_server_args(),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, **self.client)  # type: ignore[arg-type]
        try:
            wait_for(client.ping, timeout=10, message=f"redis-server on {self.port}")
        except BaseException:
            self.stop()  # a server that never answered must not outlive the tests
            raise
        finally:
            client.close()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)


def rabbitmq_available() -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A fresh vhost on the local RabbitMQ, deleted afterwards; yields its amqp:// URL."""
    name = f"pollen-test-{uuid.uuid4().hex[:8]}"
    out = rabbitmqctl("add_vhost", name)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl add_vhost failed: {out.stderr}")
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


class Process:
    """A child process (a Pollen service, a celery worker) with its output in a log file."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.args = args
        self.log_path = log
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def service(name: str, env: dict[str, str], log: Path) -> Process:
    """Start ``python -m services.<name>`` with ``env``."""
    return Process([PYTHON, "-m", f"services.{name}"], log, env)


def celery_worker(
    broker_url: str,
    log: Path,
    hostname: str = "w1@%h",
    *extra: str,
    pool: str = "threads",
    concurrency: int = 4,
    task_events: bool = True,
    env: dict[str, str] | None = None,
) -> Process:
    """A real ``celery -A demo.app worker`` (no mingle/gossip). ``task_events=False`` starts it
    with task events off, as a worker without ``-E`` (``DEMO_TASK_EVENTS=0``)."""
    args = [
        PYTHON,
        "-m",
        "celery",
        "-A",
        "demo.app",
        "worker",
        "--loglevel",
        "INFO",
        "--hostname",
        hostname,
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        *extra,
    ]
    full_env = {"POLLEN_BROKER_URL": broker_url, **(env or {})}
    if not task_events:
        full_env["DEMO_TASK_EVENTS"] = "0"
    return Process(args, log, full_env)


def pollen_env(
    broker_url: str, redis_url: str, namespace: str = "test", **settings: str
) -> dict[str, str]:
    env = {
        "POLLEN_BROKER_URL": broker_url,
        "POLLEN_REDIS_URL": redis_url,
        "POLLEN_NAMESPACE": namespace,
        "POLLEN_LOG_LEVEL": "INFO",
    }
    env.update({f"POLLEN_{k.upper()}": v for k, v in settings.items()})
    return env


class RedisCluster:
    """Three redis-server nodes in cluster mode (no replicas), created with redis-cli."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.servers = [
            RedisServer(
                workdir / f"node{i}",
                free_cluster_port(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            )
            for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}/0"

    def start(self) -> RedisCluster:
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
        out = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        client = redis.Redis(port=self.servers[0].port)
        wait_for(
            lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"),
            timeout=20,
            message="cluster_state:ok",
        )
        client.close()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


NGINX = "/usr/sbin/nginx"


@dataclass
class Proxy:
    """Debian's nginx in front of an API process, on a free loopback port."""

    port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop()


def run_nginx(workdir: Path, http: str, port: int) -> Proxy:
    """nginx with ``http`` (what goes inside its ``http`` block) as its whole configuration,
    its files in ``workdir``; returns once ``port`` answers any HTTP status."""
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed: run .ci/run (or `apt-get install nginx`)")
    workdir.mkdir(parents=True, exist_ok=True)
    temp = " ".join(
        f"{kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (workdir / "nginx.conf").write_text(
        f"""daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{}}
http {{
    access_log off;
    {temp}
{http}
}}
"""
    )
    process = Process(
        [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf")], workdir / "nginx.log", {}
    )
    proxy = Proxy(port, process)

    def up() -> bool:
        if not process.alive():
            raise RuntimeError(f"nginx exited:\n{process.output()}")
        try:
            with urllib.request.urlopen(f"{proxy.url}/healthz", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # answered (through to the API, or nginx's own 401)
        except OSError:
            return False

    try:
        wait_for(up, timeout=20, message=f"nginx on {port}")
    except BaseException:
        process.stop()
        raise
    return proxy


def start_proxy(upstream_port: int, workdir: Path) -> Proxy:
    """The compose proxy (deploy/nginx.conf, as docker-compose.yml mounts it), its upstream
    pointed at ``upstream_port`` on loopback."""
    port = free_port()
    server = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in (
        ("server api:5555", f"server 127.0.0.1:{upstream_port}"),
        ("listen 5555;", f"listen 127.0.0.1:{port};"),
    ):
        assert old in server, f"deploy/nginx.conf no longer has {old!r}: update this test"
        server = server.replace(old, new)
    return run_nginx(workdir, server, port)


# --- a private RabbitMQ node -----------------------------------------------------------------


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def private_rabbitmq_possible() -> bool:
    return os.path.exists(RABBITMQ_SERVER) and shutil.which("erl") is not None


class RabbitNode:
    """A RabbitMQ node of its own (Debian's rabbitmq-server: own node name, ports, data and log
    dirs, cookie in its own HOME), so a test can stop and restart a broker without touching the
    shared one. ``tls``: ``ssl_options`` lines of rabbitmq.conf; the node then listens on
    ``port`` with TLS only."""

    def __init__(self, workdir: Path, tls: str = "") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"pollen-{uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        conf = "loopback_users = none\n"
        if tls:
            conf += f"listeners.tcp = none\nlisteners.ssl.default = {self.port}\n{tls}"
        (workdir / "rabbitmq.conf").write_text(conf)
        (workdir / "rabbitmq-env.conf").write_text("")
        (workdir / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(workdir),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            **({} if tls else {"RABBITMQ_NODE_PORT": str(self.port)}),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(workdir / "plugins-expand"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> RabbitNode:
        if not private_rabbitmq_possible():
            pytest.fail(f"{RABBITMQ_SERVER} is not installed: run .ci/services (Debian's package)")
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [RABBITMQ_SERVER],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()

        def accepting() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {self.log_tail()}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        try:
            wait_for(accepting, timeout=120, interval=0.2, message=f"RabbitMQ node {self.name}")
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """A clean stop (as ``systemctl restart`` does): SIGTERM, wait for the node to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # the node's children (erl_child_setup, inet_gethost) go with its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


# --- processes' memory and logs ----------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def log_problems(text: str) -> list[str]:
    """Lines of a service log that report an error or a traceback."""
    return [
        line
        for line in text.splitlines()
        if " ERROR " in line or "Traceback" in line or " CRITICAL " in line
    ]
