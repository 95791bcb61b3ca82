"""``make run``'s launcher end to end: against a private Redis it starts itself (POLLEN_REDIS_URL
names a free port), on free API ports; both replicas get ready, the demo traffic's tasks are in
/api/tasks and its events arrive on the WebSocket, the healthchecks the containers use pass;
then SIGINT (what Ctrl-C sends) stops every process it started, and their ports close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from demo.launcher import answers, port_free, private_redis_port
from tests.support.servers import PYTHON, ROOT, free_port, wait_for

#: What the launcher starts (a substring of each command line).
EXPECTED = {
    "redis": "redis-server",
    "worker": "celery -A demo.app worker",
    "collector": "-m services.collector",
    "enabler": "-m services.enabler",
    "api": "-m services.api",
    "traffic": "-m demo.traffic",
}


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    start: int  # clock ticks after boot: with the pid, names one process for good
    cmdline: str


def processes() -> dict[int, Proc]:
    """Every process on the machine, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        found[pid] = Proc(pid, int(fields[1]), int(fields[3]), int(fields[19]), cmdline)
    return found


def http(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def task_events(port: int, count: int, timeout: float) -> list[dict[str, Any]]:
    """The first ``count`` demo task events the WebSocket sends."""
    events: list[dict[str, Any]] = []
    url = f"ws://127.0.0.1:{port}/api/events"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url) as ws,
        asyncio.timeout(timeout),
    ):
        async for message in ws:
            assert message.type == aiohttp.WSMsgType.TEXT, message
            event = json.loads(message.data)
            if event.get("type", "").startswith("task-") and str(event.get("task_name")).startswith(
                "demo.app."
            ):
                events.append(event)
                if len(events) >= count:
                    break
    return events


def healthcheck(kind: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "services.healthcheck", kind],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


class Launcher:
    def __init__(self, tmp: Path) -> None:
        self.redis_port = free_port()
        self.api_ports = (free_port(), free_port())
        while self.api_ports[1] in (self.api_ports[0], self.redis_port):
            self.api_ports = (self.api_ports[0], free_port())
        self.run_dir = tmp / "run"
        self.out_path = tmp / "launcher.out"
        # the environment of a user who set nothing but where Pollen's Redis should be
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("POLLEN_", "DEMO_"))}
        self.env["POLLEN_REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/1"
        self._out = self.out_path.open("wb")
        #: every child seen, so that a failed test still stops them
        self.seen: dict[int, Proc] = {}
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "demo.launcher",
                "--quiet",
                "--rate",
                "20",
                "--api-ports",
                ",".join(map(str, self.api_ports)),
                "--run-dir",
                str(self.run_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.run_dir / "logs").glob("*.log"))
        )

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the launcher exited ({self.proc.returncode}):\n{self.output()}\n{self.logs()}"
            )
        return True

    def children(self) -> list[Proc]:
        found = [p for p in processes().values() if p.ppid == self.proc.pid]
        self.seen.update((p.pid, p) for p in found)
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    started = Launcher(tmp_path)
    try:
        yield started
    finally:
        started.children()
        started.close()
        # a failed test must not leave the stack running either
        now = processes()
        for child in started.seen.values():
            if child.pid in now and now[child.pid].start == child.start:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)


def test_make_run_launcher_end_to_end(launcher: Launcher) -> None:
    a, b = launcher.api_ports

    def ready() -> bool:
        launcher.alive()
        return http(a, "/readyz")[0] == 200 and http(b, "/readyz")[0] == 200

    wait_for(ready, timeout=90, interval=0.5, message="/readyz on both replicas")
    wait_for(lambda: "Ctrl-C stops everything" in launcher.output(), message="the summary")
    output = launcher.output()
    assert f"started a private Redis on 127.0.0.1:{launcher.redis_port}" in output
    assert f"http://127.0.0.1:{a}" in output and f"http://127.0.0.1:{b}" in output

    children = launcher.children()
    commands = [c.cmdline for c in children]
    for name, fragment in EXPECTED.items():
        want = 2 if name == "api" else 1
        assert sum(fragment in c for c in commands) == want, (name, commands)
    assert len(children) == 7, commands

    # the demo traffic's tasks, in several states, from either replica
    def demo_tasks() -> dict[str, Any] | None:
        launcher.alive()
        status, tasks = http(a, "/api/tasks?limit=1000")
        assert status == 200
        demo = {k: t for k, t in tasks.items() if t["name"] and t["name"].startswith("demo.app.")}
        states = {t["state"] for t in demo.values()}
        return demo if {"SUCCESS", "FAILURE"} <= states else None

    tasks = wait_for(demo_tasks, timeout=60, interval=0.5, message="demo tasks in /api/tasks")
    assert isinstance(tasks, dict)
    assert len({t["name"] for t in tasks.values()}) >= 4, tasks
    some = next(iter(tasks))
    status, info = http(b, f"/api/task/info/{some}")
    assert status == 200 and info["uuid"] == some

    # live events on the WebSocket of the other replica
    events = asyncio.run(task_events(b, 5, timeout=60))
    assert len(events) == 5
    assert all(e["hostname"] and e["uuid"] and "stream_id" in e for e in events), events

    # what the containers' healthchecks run passes against the real services
    env = {**launcher.env, "POLLEN_API_PORT": str(a)}
    for kind in ("api", "collector", "enabler"):
        result = healthcheck(kind, env)
        assert result.returncode == 0, (kind, result.stderr)
    traffic = subprocess.run(
        [PYTHON, "-m", "demo.traffic", "--check"],
        env={**launcher.env, "POLLEN_BROKER_URL": f"redis://127.0.0.1:{launcher.redis_port}/0"},
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert traffic.returncode == 0, traffic.stderr

    # Ctrl-C: everything stops, nothing is left
    launcher.proc.send_signal(signal.SIGINT)
    assert launcher.proc.wait(60) == 0, launcher.output()
    assert launcher.output().rstrip().endswith("stopped.")
    sessions = {c.pid for c in children}

    def left_over() -> list[Proc]:
        now = processes()
        left = [p for p in now.values() if p.session in sessions]
        left += [now[c.pid] for c in children if c.pid in now and now[c.pid].start == c.start]
        return list(set(left))

    # a killed process is gone from /proc only once it has exited and been reaped, which a
    # loaded machine can delay: polled until nothing is left, with a deadline
    with contextlib.suppress(TimeoutError):  # the assertion below names what is left
        wait_for(lambda: not left_over(), timeout=30, interval=0.2, message="nothing left")
    left = left_over()
    assert not left, left
    for port in (launcher.redis_port, a, b):
        assert not listening(port), port

    stopped = healthcheck("api", env)
    assert stopped.returncode == 1 and "unhealthy" in stopped.stderr

    # each process logged to its own file
    logs = {p.stem: p.read_text(errors="replace") for p in (launcher.run_dir / "logs").iterdir()}
    assert set(logs) == {"redis", "worker", "collector", "enabler", "api1", "api2", "traffic"}
    assert "demo.app.add" in logs["worker"]
    assert "sending about 20.0 tasks/s" in logs["traffic"]


def test_private_redis_port() -> None:
    """The URL's own port when nothing listens there; another free one when something that is
    not a Redis does; none for a Redis on another machine."""
    port = free_port()
    assert private_redis_port(f"redis://127.0.0.1:{port}/1") == port
    assert private_redis_port(f"redis://localhost:{port}") == port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not answers(f"redis://127.0.0.1:{taken}/1")
        other = private_redis_port(f"redis://127.0.0.1:{taken}/1")
        assert other is not None and other != taken and port_free(other)
    assert private_redis_port("redis://redis.example:6379/1") is None
    assert private_redis_port("rediss://127.0.0.1:6380/1") is None
