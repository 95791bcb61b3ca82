"""Install as users do: the wheel into a fresh virtualenv with no extras (what the Dockerfile
does), then the console scripts against real brokers. Every run-time import must come from a
declared dependency: kombu's Redis transport, for one, needs ``packaging``, which only
``kombu[redis]`` brings, so a bare ``pip install .`` without it crashed on a Redis broker while
the test virtualenv (``.[test]``) happened to have it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import (
    PYTHON,
    ROOT,
    Process,
    RedisServer,
    celery_worker,
    free_port,
    rabbitmq_available,
    rabbitmq_vhost,
    wait_for,
)

SCRIPTS = ("pollen-collector", "pollen-enabler", "pollen-api")
#: Modules a deployment loads lazily, by URL scheme: kombu's transports, Celery's backend.
LAZY = ("kombu.transport.redis", "kombu.transport.pyamqp", "celery.backends.redis")


def _run(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-4000:])


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding the wheel and its declared dependencies only; its directory."""
    work = tmp_path_factory.mktemp("bare")
    # built from a copy of the tracked files: a build leaves build/ beside its sources
    source = work / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        target = source / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name.decode(), target)
    _run(PYTHON, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", source, cwd=work)
    (wheel,) = (work / "dist").glob("pollen-*.whl")
    # the test virtualenv's base interpreter, without its site-packages
    base = getattr(sys, "_base_executable", sys.executable)
    _run(base, "-m", "venv", work / "venv", cwd=work)
    _run(work / "venv" / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=work)
    return work / "venv"


def test_every_module_imports_from_declared_dependencies(bare: Path) -> None:
    """Every module of the installed packages and the lazily loaded transports import in the
    bare virtualenv, away from the source tree."""
    check = (
        "import importlib, pkgutil, services, shared, demo\n"
        "names = [m.name for p in (services, shared, demo)"
        " for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]\n"
        f"names += {list(LAZY)!r}\n"
        "for n in names: importlib.import_module(n)\n"
        "print(len(names), services.__file__)\n"
    )
    done = subprocess.run(
        [str(bare / "bin" / "python"), "-c", check],
        cwd=bare,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    count, where = done.stdout.split()
    assert int(count) > 30 and str(bare) in where  # the installed copy, not the source tree


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "redis":
        server = RedisServer(tmp_path / "broker").start()
        try:
            yield server.url
        finally:
            server.stop()
    else:
        if not rabbitmq_available():
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672: run .ci/run")
        with rabbitmq_vhost() as url:
            yield url


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_console_scripts_monitor_and_control_a_cluster(
    bare: Path, broker: str, tmp_path: Path
) -> None:
    state = RedisServer(tmp_path / "state").start()
    port = free_port()
    env = {
        "POLLEN_BROKER_URL": broker,
        "POLLEN_REDIS_URL": state.url,
        "POLLEN_NAMESPACE": "bare",
        "POLLEN_API_PORT": str(port),
        "POLLEN_ENABLE_INTERVAL": "1",
        "POLLEN_INSPECT_INTERVAL": "2",
        "PYTHONPATH": "",
    }
    services = [
        Process([str(bare / "bin" / script)], tmp_path / f"{script}.log", env, cwd=tmp_path)
        for script in SCRIPTS
    ]
    # the user's worker: its own code, started without events (the enabler turns them on)
    worker = celery_worker(broker, tmp_path / "worker.log", "bare@test", task_events=False)
    api = f"http://127.0.0.1:{port}"
    try:
        from demo.traffic import client

        app = client(broker)
        try:

            def worker_known() -> bool:
                for p in services:
                    assert p.alive(), p.output()[-3000:]
                try:
                    found = _get(f"{api}/api/workers?workername=bare@test")
                except OSError:
                    return False
                return "registered" in found.get("bare@test", {})

            wait_for(worker_known, timeout=90, message="the worker, with inspect data")
            ids = [app.send_task("demo.app.add", (i, i)).id for i in range(5)]
        finally:
            app.close()

        def all_done() -> bool:
            tasks = _get(f"{api}/api/tasks?taskname=demo.app.add&state=SUCCESS")
            return set(ids) <= set(tasks)

        wait_for(all_done, timeout=90, message="the tasks, through the collector, in the API")
        # control from the API: its own Celery app on the broker
        request = urllib.request.Request(
            f"{api}/api/worker/queue/add-consumer/bare@test?queue=extra", data=b"", method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert "extra" in json.loads(resp.read())["message"]
        for p in services:
            assert "Traceback" not in p.output(), p.output()[-3000:]
    finally:
        worker.stop()
        for p in services:
            p.stop()
        state.stop()
