"""``make run``: the whole stack on this machine, no Docker.

Uses the Redis at ``POLLEN_REDIS_URL`` if one answers. Else, when that URL is on this machine,
starts a private redis-server (on the URL's port if it is free, else on a free port; Debian's
package is installed first when it is missing and apt-get can). Then starts a demo Celery worker
(Redis as the broker unless ``POLLEN_BROKER_URL`` says otherwise), demo traffic, the collector,
the enabler and two API replicas, prints where to look, and on Ctrl-C (or SIGTERM) stops
everything it started. Each process logs to ``<run dir>/logs/<name>.log``; the console shows
every line prefixed with its process name (``--quiet``: only the launcher's own lines).

``--api-ports`` (or ``DEMO_API_PORTS``) picks the replicas' ports, ``--run-dir`` (or
``DEMO_RUN_DIR``) where logs and the private Redis's data go.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu.utils.url import maybe_sanitize_url

from shared.connections import redis_server_args
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_API_PORTS = "5555,5556"
#: Seconds each process gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    threads: list[threading.Thread] = field(default_factory=list)


class Stack:
    """The processes started so far; each in its own session, so a signal reaches all of it."""

    def __init__(self, run_dir: Path, quiet: bool) -> None:
        self.children: list[Child] = []
        self.run_dir = run_dir
        self.quiet = quiet
        self.lock = threading.Lock()
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        log = open(self.run_dir / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        child = Child(name, proc, log)
        reader = threading.Thread(target=self._pump, args=(child,), daemon=True)
        reader.start()
        child.threads.append(reader)
        self.children.append(child)
        return child

    def _pump(self, child: Child) -> None:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            child.log.write(line)
            child.log.flush()
            if not self.quiet:
                with self.lock:
                    sys.stdout.write(f"{child.name:>10} | {line.decode(errors='replace')}")
                    sys.stdout.flush()

    def failed(self) -> list[str]:
        return [c.name for c in self.children if c.proc.poll() is not None]

    def stop(self) -> None:
        """SIGTERM to every process group but Redis's, wait, then Redis (so nothing that still
        runs loses its Redis); SIGKILL for any group that outlives ``STOP_TIMEOUT``."""
        redis_last = [c for c in self.children if c.name != "redis"]
        self._stop_all(redis_last)
        self._stop_all([c for c in self.children if c.name == "redis"])

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, sig)

    def _stop_all(self, children: list[Child]) -> None:
        for child in children:
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{child.name} did not stop in {STOP_TIMEOUT:g} s: killing it", flush=True)
                child.proc.kill()
                child.proc.wait(5)
            # the group may hold more than the leader (a prefork pool, say)
            self._signal(child, signal.SIGKILL)
            for t in child.threads:
                t.join(2)
            child.log.close()


def answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (and it may be bound)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def private_redis_port(url: str) -> int | None:
    """Where to start a private redis-server for ``url`` (None: the URL is not on this machine):
    the URL's own port if nothing listens there, else a free one."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not is_local(parts.hostname or ""):
        return None
    port = parts.port or 6379
    return port if port_free(port) else free_port()


def with_port_db(url: str, port: int, db: int) -> str:
    """``url`` on 127.0.0.1:``port``, database ``db`` (credentials and options kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit(("redis", netloc, f"/{db}", parts.query, parts.fragment))


def redis_db(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server") or (
        "/usr/sbin/redis-server" if os.path.exists("/usr/sbin/redis-server") else None
    )
    if found or not shutil.which("apt-get"):
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo"):
        return None
    print("redis-server is missing: installing Debian's package ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "redis-server"], check=False, env=env)
    return shutil.which("redis-server")


def wait_http(url: str, timeout: float, stopping: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping.is_set():
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        stopping.wait(0.3)
    return False


def parse_ports(text: str) -> tuple[int, int]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        ports = ()
    if len(ports) != 2 or not all(0 < p < 65536 for p in ports) or ports[0] == ports[1]:
        raise argparse.ArgumentTypeError(f"need two different ports like 5555,5556, not {text!r}")
    return ports[0], ports[1]


def start_redis(stack: Stack, binary: str, port: int) -> None:
    data = stack.run_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    stack.start(
        "redis",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            *redis_server_args(),
        ],
        {},
    )


def use_or_start_redis(stack: Stack, redis_url: str, broker_url: str) -> tuple[str, str] | None:
    """(Pollen's Redis URL, broker URL, empty if unset) once a Redis answers there: the one at
    ``redis_url``, or a private one started for it; None, having said why, when neither."""
    shown = maybe_sanitize_url(redis_url)
    again = "then run `make run` again."
    if answers(redis_url):
        print(f"using the Redis at {shown}", flush=True)
        return redis_url, broker_url
    if private_redis_port(redis_url) is None:
        print(
            f"No Redis answers at POLLEN_REDIS_URL ({shown}), which is not on this machine.\n"
            f"Start that Redis, or unset POLLEN_REDIS_URL to use a private one, {again}",
            file=sys.stderr,
        )
        return None
    binary = redis_server_binary()
    if binary is None:
        print(
            f"No Redis answers at POLLEN_REDIS_URL ({shown}) and redis-server is not installed."
            "\nInstall it (Debian/Ubuntu: sudo apt-get install redis-server) or point "
            f"POLLEN_REDIS_URL at a Redis, {again}",
            file=sys.stderr,
        )
        return None
    if answers(redis_url):  # the package just installed started its service there
        print(f"using the Redis at {shown}", flush=True)
        return redis_url, broker_url
    port = private_redis_port(redis_url)
    assert port is not None
    start_redis(stack, binary, port)
    private = with_port_db(redis_url, port, redis_db(redis_url))
    if broker_url and urlsplit(broker_url).netloc == urlsplit(redis_url).netloc:
        broker_url = with_port_db(broker_url, port, redis_db(broker_url))
    deadline = time.monotonic() + 10
    while not answers(private):
        if stack.failed() or time.monotonic() > deadline:
            print(f"redis-server did not start: see {stack.run_dir / 'logs'}", file=sys.stderr)
            return None
        time.sleep(0.1)
    print(
        f"started a private Redis on 127.0.0.1:{port} (data in {stack.run_dir / 'redis'})",
        flush=True,
    )
    return private, broker_url


def serves_page(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def shown_python() -> str:
    """This Python as the user would type it from the repository (``.venv/bin/python``)."""
    path = Path(PYTHON)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def summary(ports: tuple[int, int], ready: bool, run_dir: Path) -> str:
    base = f"http://127.0.0.1:{ports[0]}"
    lines = [
        "",
        "Pollen is running" + ("." if ready else " (the API is not ready yet: see the logs)."),
        f"  API replicas   {base}  and  http://127.0.0.1:{ports[1]}",
    ]
    if serves_page(f"{base}/"):
        lines.append(f"  dashboard      {base}/  (open it in a browser)")
    lines += [
        f"  tasks          curl '{base}/api/tasks?limit=5'",
        f"  failures       curl '{base}/api/tasks?state=FAILURE&limit=5'",
        f"  search         curl '{base}/api/tasks?search=name:flaky&limit=5'",
        f"  one task       curl '{base}/api/task/info/<uuid>'",
        f"  workers        curl '{base}/api/workers?status=1'",
        f"  queues         curl '{base}/api/queues/length'",
        f"  by cause       curl '{base}/api/failures'",
        f"  waits          curl '{base}/api/stats/wait?minutes=15'",
        f"  metrics        curl '{base}/metrics'",
        f"  readiness      curl 'http://127.0.0.1:{ports[1]}/readyz'",
        f"  API reference  curl '{base}/api/openapi.json'",
        f"  live events    {shown_python()} -m demo.watch ws://127.0.0.1:{ports[1]}/api/events",
        f"  logs           {run_dir / 'logs'}/<process>.log",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quiet", action="store_true", help="only the launcher's own lines")
    parser.add_argument("--rate", type=float, default=5.0, help="demo tasks per second")
    parser.add_argument(
        "--api-ports",
        type=parse_ports,
        default=os.environ.get("DEMO_API_PORTS") or DEFAULT_API_PORTS,
        help=f"the two API replicas' ports (default: $DEMO_API_PORTS or {DEFAULT_API_PORTS})",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path(os.environ.get("DEMO_RUN_DIR") or ROOT / ".run"),
        help="where logs and the private Redis's data go (default: $DEMO_RUN_DIR or .run)",
    )
    options = parser.parse_args()
    api_ports: tuple[int, int] = options.api_ports
    run_dir: Path = options.run_dir.resolve()

    busy = [p for p in api_ports if not port_free(p)]
    if busy:
        print(
            f"port(s) {', '.join(map(str, busy))} are in use (another `make run`?): stop that, "
            "or pick others: DEMO_API_PORTS=6555,6556 make run",
            file=sys.stderr,
        )
        return 1

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    stack = Stack(run_dir, options.quiet)
    defaults = Settings()
    redis_url = os.environ.get("POLLEN_REDIS_URL") or defaults.redis_url
    broker_url = os.environ.get("POLLEN_BROKER_URL") or ""
    try:
        found = use_or_start_redis(stack, redis_url, broker_url)
        if found is None:
            return 1
        redis_url, broker_url = found
        if not broker_url:
            # the demo's broker: the same Redis, another database
            broker_db = 0 if redis_db(redis_url) != 0 else 1
            parts = urlsplit(redis_url)
            broker_url = urlunsplit((*parts[:2], f"/{broker_db}", *parts[3:]))

        if stopping.is_set():
            return 0
        # task results (for /api/task/apply, result, abort): a third database of that Redis
        used = {redis_db(redis_url), redis_db(broker_url) if broker_url.startswith("redis") else -1}
        parts = urlsplit(redis_url)
        result_db = min(set(range(2, 16)) - used)
        result_url = urlunsplit((*parts[:2], f"/{result_db}", *parts[3:]))
        env = {
            "POLLEN_REDIS_URL": redis_url,
            "POLLEN_BROKER_URL": broker_url,
            "POLLEN_RESULT_BACKEND": result_url,
            "DEMO_RESULT_BACKEND": result_url,
        }
        stack.start(
            "worker",
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "demo.app",
                "worker",
                "--loglevel",
                "INFO",
                "--hostname",
                "demo@%h",
                # prefork, so pool grow/shrink/restart work from the dashboard and the API
                "--pool",
                "prefork",
                "--concurrency",
                "2",
            ],
            env,
        )
        stack.start("collector", [PYTHON, "-m", "services.collector"], env)
        stack.start("enabler", [PYTHON, "-m", "services.enabler"], env)
        for i, port in enumerate(api_ports, 1):
            stack.start(
                f"api{i}",
                [PYTHON, "-m", "services.api"],
                {**env, "POLLEN_API_HOST": "127.0.0.1", "POLLEN_API_PORT": str(port)},
            )
        stack.start("traffic", [PYTHON, "-m", "demo.traffic", "--rate", str(options.rate)], env)
        print(
            f"broker {maybe_sanitize_url(broker_url)}, "
            f"Pollen's state in {maybe_sanitize_url(redis_url)}",
            flush=True,
        )

        ready = all(wait_http(f"http://127.0.0.1:{p}/readyz", 60, stopping) for p in api_ports)
        if not stopping.is_set():
            print(summary(api_ports, ready, run_dir), flush=True)
        while not stopping.wait(0.5):
            dead = stack.failed()
            if dead:
                print(
                    f"stopping: {', '.join(dead)} exited (see {run_dir / 'logs'})",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
