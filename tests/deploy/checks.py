"""What every deployment must show, end to end through the user's app: the worker with its
inspect answers (the enabler's broadcasts on the app's control exchange), every task the
user's client sends (the collector on the app's event exchange), a task published and a
control command sent from the API, and the length of a queue nobody consumes."""

from __future__ import annotations

import time
import urllib.error
from typing import Any

from tests.deploy.conftest import Deployment
from tests.support.servers import wait_for

#: Pollen's loops at test speed; the queue every scenario measures (``backlog_measured``).
QUICK = {
    "POLLEN_ENABLE_INTERVAL": "1",
    "POLLEN_INSPECT_INTERVAL": "2",
    "POLLEN_QUEUE_INTERVAL": "1",
    "POLLEN_QUEUES": "backlog",
    "POLLEN_INSPECT_TIMEOUT": "5",
}


def worker_inspected(d: Deployment, since: float = 0.0) -> None:
    """The worker is listed with inspect answers, the newest of them stored after ``since``
    (epoch seconds): it answered the enabler's broadcasts through the broker at that time."""

    def fresh() -> bool:
        for name, process in d.processes.items():
            assert process.alive(), f"{name} exited:\n{d.logs()}"
        found = d.get(f"/api/workers?workername={d.worker_name}").get(d.worker_name, {})
        return "registered" in found and "stats" in found and found["timestamp"] > since

    wait_for(fresh, timeout=90, message=lambda: f"inspect answers of {d.worker_name}\n{d.logs()}")


def events_flow(d: Deployment, since: float) -> None:
    """A heartbeat the worker sent after ``since`` (epoch seconds) has reached Pollen: the
    worker publishes events and the collector receives them (on a Redis broker events are
    pub/sub messages, which the broker keeps for no one who is not subscribed yet)."""

    def heard() -> bool:
        for row in d.get("/api/stats/workers")["workers"]:
            if row["hostname"] == d.worker_name:
                return (row["last_heartbeat"] or 0) > since
        return False

    wait_for(heard, timeout=90, message=lambda: f"a heartbeat after {since:.1f}\n{d.logs()}")


def tasks_seen(d: Deployment, app: Any, count: int, tag: int) -> set[str]:
    """``count`` tasks sent by the user's client and one by the API all end in SUCCESS."""
    ids = {app.send_task(f"{d.module}.add", (tag, i)).id for i in range(count)}
    sent = d.post(f"/api/task/async-apply/{d.module}.add", {"args": [tag, -1]})
    ids.add(sent["task-id"])

    def missing() -> set[str]:
        found = d.get(f"/api/tasks?taskname={d.module}.add&state=SUCCESS&limit=1000")
        return ids - set(found)

    def state(u: str) -> str:
        try:
            return str(d.get(f"/api/task/info/{u}").get("state"))
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"

    def said() -> str:
        states = {u: state(u) for u in sorted(missing())}
        return f"tasks in SUCCESS in the API, not yet {states}\n{d.logs()}"

    wait_for(lambda: not missing(), timeout=90, message=said)
    return ids


def control_works(d: Deployment, queue: str) -> None:
    answer = d.post(f"/api/worker/queue/add-consumer/{d.worker_name}?queue={queue}")
    assert queue in answer["message"], answer


def backlog_measured(d: Deployment, app: Any, queue: str, count: int) -> None:
    """``count`` more messages on ``queue`` (no consumer) show in ``/api/queues/length``."""

    def length() -> int:
        for sample in d.get("/api/queues/length")["active_queues"]:
            if sample["name"] == queue:
                return int(sample["messages"])
        return 0

    before = length()
    for i in range(count):
        app.send_task(f"{d.module}.add", (0, i), queue=queue, priority=(i * 3) % 10)
    started = time.monotonic()
    wait_for(
        lambda: length() == before + count,
        timeout=60,
        message=lambda: f"{before + count} messages on {queue} (since {started:.0f})\n{d.logs()}",
    )


def no_tracebacks(d: Deployment) -> None:
    for name, process in d.processes.items():
        if name != "worker":
            assert "Traceback" not in process.output(), f"{name}:\n{process.output()[-4000:]}"
