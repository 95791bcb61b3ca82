"""The systems under test as real processes: brokers, Flower, Pollen's collectors.

Every start has a matching stop; the harness runs them in ``with`` blocks so nothing is left
running when a scenario fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from shared.keys import SEP, Keys
from tests.support.servers import Process, RedisServer, free_port, rabbitmqctl, wait_for

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def rss(pids: list[int]) -> int:
    """Resident memory of these processes and their children, in bytes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            total += proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += child.memory_info().rss
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


# --- brokers --------------------------------------------------------------------------------


class Broker:
    """A fresh, private broker: nothing left from an earlier run can be counted."""

    kind = ""
    url = ""

    def event_consumers(self) -> int:
        """How many event receivers are listening (queues bound to celeryev / psubscribers)."""
        raise NotImplementedError

    def backlog(self) -> int:
        """Events waiting in the broker for a consumer (0 where the broker keeps none)."""
        return 0

    def wait_consumers(self, n: int, timeout: float = 60.0) -> None:
        wait_for(
            lambda: self.event_consumers() >= n,
            timeout=timeout,
            interval=0.2,
            message=f"{n} event consumer(s) on {self.kind}",
        )

    def close(self) -> None:
        raise NotImplementedError


class RabbitBroker(Broker):
    kind = "rabbitmq"

    def __init__(self) -> None:
        self.vhost = f"pollen-bench-{uuid.uuid4().hex[:8]}"
        out = rabbitmqctl("add_vhost", self.vhost)
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl add_vhost failed: {out.stderr}")
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.url = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def _queues(self) -> list[tuple[str, int, int]]:
        out = rabbitmqctl("list_queues", "-p", self.vhost, "name", "consumers", "messages")
        rows = []
        for line in out.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                rows.append((parts[0], int(parts[1]), int(parts[2])))
        return rows

    def event_consumers(self) -> int:
        return sum(
            consumers for name, consumers, _ in self._queues() if not name.endswith("pidbox")
        )

    def backlog(self) -> int:
        return sum(messages for name, _, messages in self._queues() if "pidbox" not in name)

    def close(self) -> None:
        rabbitmqctl("delete_vhost", self.vhost)


class RedisBroker(Broker):
    kind = "redis"

    def __init__(self, workdir: Path) -> None:
        self.server = RedisServer(workdir / "broker").start()
        self.url = f"redis://127.0.0.1:{self.server.port}/0"
        self.client = redis.Redis(port=self.server.port)

    def event_consumers(self) -> int:
        # PUBSUB NUMPAT counts distinct patterns; each receiver has its own psubscription
        clients = self.client.client_list()
        return sum(1 for c in clients if int(c.get("psub", 0)) > 0)

    def close(self) -> None:
        self.client.close()
        self.server.stop()


@contextlib.contextmanager
def broker(kind: str, workdir: Path) -> Iterator[Broker]:
    b: Broker = RabbitBroker() if kind == "rabbitmq" else RedisBroker(workdir)
    try:
        yield b
    finally:
        b.close()


# --- systems under test ---------------------------------------------------------------------


@dataclass
class Counted:
    """A system's view of how many events it has applied."""

    task_events: int
    worker_events: int


class System:
    """A monitor under test: started against a broker, asked what it counted."""

    label = ""

    def pids(self) -> list[int]:
        raise NotImplementedError

    def counted(self) -> Counted:
        raise NotImplementedError

    def memory(self) -> dict[str, int]:
        """Bytes: ``rss`` of its processes, ``redis`` used_memory where it has a Redis."""
        return {"rss": rss(self.pids()), "redis": 0}

    def consumers(self) -> int:
        """Event consumers it opens on the broker."""
        return 1

    def stop(self) -> None:
        raise NotImplementedError


def api_process(env: dict[str, str], workdir: Path, index: int) -> tuple[Process, str]:
    """Start one ``python -m services.api`` with ``env``; wait for /healthz."""
    port = free_port()
    full = {**env, "POLLEN_API_PORT": str(port), "POLLEN_API_HOST": "127.0.0.1"}
    proc = Process([sys.executable, "-m", "services.api"], workdir / f"api{index}.log", env=full)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: _http_ok(base + "/healthz", proc),
            timeout=60,
            interval=0.2,
            message="pollen api /healthz",
        )
    except BaseException:
        proc.stop()
        raise
    return proc, base


def _http_ok(url: str, proc: Process) -> bool:
    if not proc.alive():
        raise RuntimeError(f"{proc.args} exited: {proc.output()[-2000:]}")
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


_METRIC = re.compile(r"^flower_events_total\{([^}]*)\}\s+([0-9.e+]+)$", re.M)


class Flower(System):
    label = "Flower"

    def __init__(self, broker_url: str, workdir: Path, max_tasks: int) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Process(
            [
                str(BIN / "celery"),
                "--broker",
                broker_url,
                "flower",
                f"--port={self.port}",
                "--address=127.0.0.1",
                f"--max_tasks={max_tasks}",
                "--persistent=False",
                f"--db={workdir / 'flower.db'}",
                "--logging=warning",
            ],
            workdir / "flower.log",
            env={"FLOWER_UNAUTHENTICATED_API": "true"},
            cwd=workdir,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        wait_for(self._healthy, timeout=60, interval=0.2, message="flower /healthcheck")

    def _healthy(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"flower exited: {self.proc.output()[-2000:]}")
        with urllib.request.urlopen(self.base + "/healthcheck", timeout=2) as resp:
            return bool(resp.status == 200)

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def counted(self) -> Counted:
        # /metrics is served by Flower's io loop, after the events queued before the request
        with urllib.request.urlopen(self.base + "/metrics", timeout=120) as resp:
            text = resp.read().decode()
        tasks = 0
        for labels, value in _METRIC.findall(text):
            if 'type="task-' in labels:
                tasks += int(float(value))
        return Counted(task_events=tasks, worker_events=0)

    def stop(self) -> None:
        self.proc.stop()


@dataclass
class PollenConfig:
    namespace: str = "bench"
    shards: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)


class Pollen(System):
    """``python -m services.collector`` processes (one or more) and their private Redis."""

    def __init__(
        self, broker_url: str, workdir: Path, collectors: int, config: PollenConfig | None = None
    ) -> None:
        self.config = config or PollenConfig()
        self.label = f"Pollen ({collectors} collector{'s' if collectors > 1 else ''})"
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis_server = RedisServer(workdir / "redis").start()
        self.redis = redis.Redis(port=self.redis_server.port)
        self.keys = Keys(self.config.namespace, self.config.shards)
        self.n = collectors
        self.workdir = workdir
        self.env = {
            "POLLEN_BROKER_URL": broker_url,
            "POLLEN_REDIS_URL": self.redis_server.url,
            "POLLEN_NAMESPACE": self.config.namespace,
            "POLLEN_SHARDS": str(self.config.shards),
            "POLLEN_LOG_LEVEL": "WARNING",
            **self.config.extra_env,
        }
        if broker_url.startswith("amqp"):
            # a shared durable queue: the collectors compete for its messages
            self.env["POLLEN_EVENT_QUEUE"] = f"pollen.bench.{uuid.uuid4().hex[:6]}"
        self.procs: list[Process] = []
        self.apis: list[Process] = []
        self.start_collectors()

    def start_collectors(self) -> None:
        self.procs = [
            Process(
                [sys.executable, "-m", "services.collector"],
                self.workdir / f"collector{i}.log",
                env=self.env,
            )
            for i in range(self.n)
        ]

    def stop_collectors(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs = []

    def start_api(self, replicas: int = 1) -> list[str]:
        """``python -m services.api`` processes on this Redis; returns their base URLs."""
        bases = []
        for _ in range(replicas):
            proc, base = api_process(self.env, self.workdir, len(self.apis))
            self.apis.append(proc)
            bases.append(base)
        return bases

    def stop_api(self) -> None:
        for p in self.apis:
            p.stop()
        self.apis = []

    def api_pids(self) -> list[int]:
        return [p.pid for p in self.apis]

    def consumers(self) -> int:
        return self.n

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"collector exited: {p.output()[-2000:]}")

    def counted(self) -> Counted:
        self.check_alive()
        tasks = workers = 0
        for shard in self.keys.all_shards:
            for key, value in self.redis.hgetall(shard.counts).items():
                kind = (key.decode() if isinstance(key, bytes) else key).split(SEP)[1]
                if kind.startswith("task-"):
                    tasks += int(value)
                else:
                    workers += int(value)
        return Counted(task_events=tasks, worker_events=workers)

    def redis_memory(self) -> int:
        info = self.redis.info("memory")
        return int(info["used_memory"])

    def memory(self) -> dict[str, int]:
        redis_pid = self.redis_server.proc.pid if self.redis_server.proc else 0
        return {
            "rss": rss(self.pids()),
            "redis": self.redis_memory(),
            "redis_rss": rss([redis_pid]) if redis_pid else 0,
        }

    def stop(self) -> None:
        self.stop_api()
        self.stop_collectors()
        self.redis.close()
        self.redis_server.stop()


@contextlib.contextmanager
def running(factory: Callable[[], System]) -> Iterator[System]:
    system = factory()
    try:
        yield system
    finally:
        system.stop()


@contextlib.contextmanager
def scratch(prefix: str = "pollen-bench-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not os.environ.get("POLLEN_BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


def wait_drained(
    count: Callable[[], int],
    expected: int,
    since: float,
    idle: float = 5.0,
    timeout: float = 600.0,
    backlog: Callable[[], int] | None = None,
) -> tuple[int, float]:
    """Poll ``count()`` until it reaches ``expected`` or stops moving for ``idle`` seconds
    (with an empty broker backlog). Returns (final count, seconds from ``since`` to the last
    change)."""
    last = count()
    last_change = time.time()
    deadline = time.monotonic() + timeout
    while last < expected and time.monotonic() < deadline:
        time.sleep(0.25)
        now_count = count()
        if now_count != last:
            last, last_change = now_count, time.time()
            continue
        if time.time() - last_change >= idle and (backlog is None or backlog() == 0):
            break
    return last, max(0.0, last_change - since)
