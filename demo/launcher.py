"""``make run``: the whole stack on this machine, no Docker.

Uses the Redis at ``POLLEN_REDIS_URL`` if one answers, else starts a private redis-server
(installing Debian's package when it can). Then starts a demo Celery worker (Redis broker),
demo traffic, the collector, the enabler and two API replicas, prints where to look, and on
Ctrl-C stops everything it started. Each process logs to ``.run/logs/<name>.log``; the console
shows every line prefixed with its process name.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
PYTHON = sys.executable
API_PORTS = (5555, 5556)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    threads: list[threading.Thread] = field(default_factory=list)


class Stack:
    def __init__(self, quiet: bool) -> None:
        self.children: list[Child] = []
        self.quiet = quiet
        self.lock = threading.Lock()
        (RUN / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        log = open(RUN / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            args,
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
        for child in reversed(self.children):
            if child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in reversed(self.children):
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(5)
            for t in child.threads:
                t.join(2)
            child.log.close()


def answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found:
        return found
    if shutil.which("apt-get"):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        print("redis-server is missing: installing Debian's package ...", flush=True)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "redis-server"],
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        return shutil.which("redis-server")
    return None


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="only the summary on the console")
    parser.add_argument("--rate", default="5", help="demo tasks per second")
    options = parser.parse_args()

    stack = Stack(options.quiet)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    redis_url = os.environ.get("POLLEN_REDIS_URL", "redis://127.0.0.1:6379/1")
    broker_url = os.environ.get("POLLEN_BROKER_URL", with_db(redis_url, 0))
    try:
        if answers(redis_url):
            print(f"using the Redis at {redis_url}", flush=True)
        else:
            binary = redis_server_binary()
            if binary is None:
                print(
                    "No Redis answers at POLLEN_REDIS_URL and redis-server is not installed.\n"
                    "Install it (Debian/Ubuntu: sudo apt-get install redis-server) or point "
                    "POLLEN_REDIS_URL at a Redis, then run `make run` again.",
                    file=sys.stderr,
                )
                return 1
            port = 6379 if port_free(6379) else 6390
            while not port_free(port):
                port += 1
            (RUN / "redis").mkdir(parents=True, exist_ok=True)
            stack.start(
                "redis",
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(RUN / "redis"),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                ],
                {},
            )
            redis_url = f"redis://127.0.0.1:{port}/1"
            broker_url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while not answers(redis_url) and time.monotonic() < deadline:
                time.sleep(0.1)
            print(f"started a private Redis on port {port} (data in .run/redis)", flush=True)

        env = {"POLLEN_REDIS_URL": redis_url, "POLLEN_BROKER_URL": broker_url}
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
                "--pool",
                "threads",
                "--concurrency",
                "4",
            ],
            env,
        )
        stack.start("collector", [PYTHON, "-m", "services.collector"], env)
        stack.start("enabler", [PYTHON, "-m", "services.enabler"], env)
        for i, port in enumerate(API_PORTS, 1):
            stack.start(
                f"api{i}", [PYTHON, "-m", "services.api"], {**env, "POLLEN_API_PORT": str(port)}
            )
        stack.start("traffic", [PYTHON, "-m", "demo.traffic", "--rate", options.rate], env)

        ready = all(wait_http(f"http://127.0.0.1:{p}/readyz", 60) for p in API_PORTS)
        base = f"http://127.0.0.1:{API_PORTS[0]}"
        print(
            "\nPollen is running"
            + ("" if ready else " (the API is not ready yet: see logs)")
            + f".\n  dashboard/API  {base}/  and  http://127.0.0.1:{API_PORTS[1]}/"
            + f"\n  tasks          curl '{base}/api/tasks?limit=5'"
            + f"\n  failures       curl '{base}/api/tasks?state=FAILURE&limit=5'"
            + f"\n  workers        curl '{base}/api/workers?status=1'"
            + f"\n  queues         curl '{base}/api/queues/length'"
            + f"\n  metrics        curl '{base}/metrics'"
            + f"\n  live events    python -m demo.watch ws://127.0.0.1:{API_PORTS[0]}/api/events"
            + f"\n  logs           {RUN / 'logs'}/<process>.log"
            + "\nCtrl-C stops everything.\n",
            flush=True,
        )
        while not stopping.wait(0.5):
            dead = stack.failed()
            if dead:
                print(f"stopping: {', '.join(dead)} exited (see .run/logs/)", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
