"""End to end: a real celery worker (demo.app) on a Redis broker, the real collector process,
the API process; Flower's own EventsState listens to the same broker through celery's
EventReceiver. The API's listing and task info must equal Flower's, and the WebSocket, health
and metrics endpoints must show the same run."""

from __future__ import annotations

import asyncio
import json
import threading
import types
from pathlib import Path
from typing import Any

import aiohttp
from celery import Celery
from flower.events import EventsState
from flower.utils.tasks import iter_tasks

from tests.support.api import Api
from tests.support.servers import RedisServer, celery_worker, pollen_env, service, wait_for


class FlowerRecorder:
    """Flower's EventsState fed by celery's EventReceiver, as Flower's Events thread does."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery(broker=broker_url)
        self.state = EventsState()
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(20)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.state.event(event)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def tasks(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            out = []
            for uuid, task in iter_tasks(types.SimpleNamespace(state=self.state), limit=1000):
                d = task.as_dict()
                worker = d.pop("worker", None)
                if worker is not None:
                    d["worker"] = worker.hostname
                d["children"] = sorted(d["children"])
                out.append((uuid, d))
            return out

    def close(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)


def pollen_tasks(api: Api) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for uuid, fields in api.json("/api/tasks?limit=1000"):
        d = dict(fields)
        d["children"] = sorted(d["children"])
        out.append((uuid, d))
    return out


async def test_worker_collector_api(tmp_path: Path, start_api: Any) -> None:
    server = RedisServer(tmp_path / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    state = f"redis://127.0.0.1:{server.port}/1"
    recorder = FlowerRecorder(broker)
    collector = service("collector", pollen_env(broker, state, "e2e"), tmp_path / "collector.log")
    worker = celery_worker(broker, tmp_path / "worker.log", "e2e@%h")
    try:
        api: Api = start_api(server, "e2e", redis_url=state)  # db 1: Pollen's state
        hostname = wait_for(
            lambda: next((h for h, alive in api.json("/api/workers?status=1") if alive), None),
            timeout=60,
            message="the worker online through the collector",
        )
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{api.url}/api/events?type=task-succeeded")
            client = Celery(broker=broker)
            client.conf.task_send_sent_event = True
            add = client.send_task("demo.app.add", (1, 2))
            failing = client.send_task("demo.app.fail", ("nope",))
            mul = client.send_task("demo.app.mul", (3, 4))
            expected = {add.id: "SUCCESS", failing.id: "FAILURE", mul.id: "SUCCESS"}

            def settled() -> bool:
                got = {u: t["state"] for u, t in pollen_tasks(api)}
                return all(got.get(u) == s for u, s in expected.items())

            await asyncio.to_thread(wait_for, settled, 60, 0.2, "tasks settled in the API")
            succeeded: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while len(succeeded) < 2:
                    succeeded.append(json.loads((await ws.receive()).data))
            assert {e["uuid"] for e in succeeded} == {add.id, mul.id}
            assert all(e["hostname"] == hostname for e in succeeded)
            await ws.close()

        # the same events seen by Flower's own state machinery
        await asyncio.to_thread(
            wait_for,
            lambda: recorder.tasks() == pollen_tasks(api),
            30,
            0.2,
            "the API's listing to equal Flower's",
        )
        info = dict(api.json(f"/api/task/info/{add.id}"))
        assert info["result"] == "3" and info["worker"] == hostname
        assert info["name"] == "demo.app.add" and info["client"] is not None
        failed = dict(api.json(f"/api/task/info/{failing.id}"))
        assert "nope" in failed["exception"]
        assert dict(api.json("/api/task/types"))["task-types"] == [
            "demo.app.add",
            "demo.app.fail",
            "demo.app.mul",
        ]
        status, _, body = api.get("/readyz")
        assert status == 200, body
        metrics = api.get("/metrics")[2].decode()
        assert (
            f'flower_events_total{{worker="{hostname}",type="task-succeeded",task="demo.app.add"}}'
            in metrics
        )
        assert f'flower_worker_online{{worker="{hostname}"}} 1.0' in metrics
        assert "pollen_collector_events_per_second{" in metrics
        # the collector's health figures, each with a value for the running collector
        for family in (
            "events_total",
            "duplicates_total",
            "dropped_total",
            "evicted_total",
            "redis_errors_total",
            "broker_errors_total",
        ):
            assert f"pollen_collector_{family}{{collector=" in metrics, family
    finally:
        worker.stop()
        collector.stop()
        recorder.close()
        server.stop()
