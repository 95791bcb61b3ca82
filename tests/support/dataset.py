"""A deterministic, varied set of Celery events for the API tests and the bench.

Tasks in every state (pending from task-sent only, received, started, succeeded, failed,
retried, revoked, a custom state, nameless), timestamp ties, names differing only by case, a
non-ASCII name, args/kwargs/results for search, parents and children, live and dead workers.
"""

from __future__ import annotations

import random
import time
import uuid as uuidlib
from typing import Any

NAMES = ("tasks.add", "tasks.mul", "proj.Reports.Build", "proj.reports.build", "ünicode.task")
WORKERS = ("celery@alpha", "celery@beta", "celery@Gamma")
CLIENT = "client@app"
KINDS = (
    "pending",
    "received",
    "started",
    "success",
    "success",
    "success",
    "failure",
    "retry",
    "revoked",
    "progress",
    "nameless",
)
ARGS = (
    "(1, 2)",
    "('hello world',)",
    "('grüße', 3)",
    "(\"it's\", 'x\\\\y')",
    "()",
    "([1, 2, 3],)",
)
KWARGS = ("{}", "{'user': 'bob'}", "{'user': 'Alice', 'n': 3}", "{'path': '/tmp/report.csv'}")
RESULTS = ("'ok'", "42", "None", "'done: 7 rows'")


def base_time(hours_ago: float = 3.0) -> float:
    """A minute boundary ``hours_ago`` hours before now (received_start/end use minutes)."""
    return float(int((time.time() - hours_ago * 3600) // 60) * 60)


def task_events(count: int, seed: int = 7, base: float | None = None) -> list[dict[str, Any]]:
    """Events of ``count`` tasks, in emission order, with ``local_received``."""
    rng = random.Random(seed)
    t0 = base_time() if base is None else base
    events: list[dict[str, Any]] = []
    clocks: dict[str, int] = {}
    uuids: list[str] = []

    def emit(kind: str, hostname: str, ts: float, **fields: Any) -> None:
        clocks[hostname] = clocks.get(hostname, 0) + 1
        events.append(
            {
                "type": kind,
                "hostname": hostname,
                "timestamp": round(ts, 6),
                "local_received": round(ts + 0.01, 6),
                "clock": clocks[hostname],
                "pid": 4242,
                "utcoffset": 0,
                **fields,
            }
        )

    span = 3 * 3600 - 600
    for i in range(count):
        uuid = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        uuids.append(uuid)
        # pairs of tasks share their times: ties in every index
        ts = t0 + (i // 2) * span / max(1, count // 2)
        kind = KINDS[rng.randrange(len(KINDS))]
        name = NAMES[rng.randrange(len(NAMES))]
        worker = WORKERS[rng.randrange(len(WORKERS))]
        parent = uuids[rng.randrange(len(uuids) - 1)] if i > 3 and rng.random() < 0.1 else None
        common = {
            "uuid": uuid,
            "name": name,
            "args": ARGS[rng.randrange(len(ARGS))],
            "kwargs": KWARGS[rng.randrange(len(KWARGS))],
            "root_id": parent or uuid,
            "parent_id": parent,
            "retries": 0,
            "eta": None,
            "expires": None,
        }
        if kind == "nameless":
            emit("task-started", worker, ts + 0.2, uuid=uuid)
            continue
        if kind == "pending" or rng.random() < 0.3:
            emit(
                "task-sent",
                CLIENT,
                ts - 0.05,
                queue="celery",
                exchange="",
                routing_key="celery",
                **common,
            )
        if kind == "pending":
            continue
        emit("task-received", worker, ts, **common)
        if kind == "received":
            continue
        if kind == "revoked":
            emit(
                "task-revoked",
                worker,
                ts + 0.1,
                uuid=uuid,
                terminated=False,
                signum=None,
                expired=False,
            )
            continue
        emit("task-started", worker, ts + 0.2, uuid=uuid)
        if kind == "success":
            emit(
                "task-succeeded",
                worker,
                ts + 0.5,
                uuid=uuid,
                result=RESULTS[rng.randrange(len(RESULTS))],
                runtime=rng.random() * 2,
            )
        elif kind == "failure":
            emit(
                "task-failed",
                worker,
                ts + 0.5,
                uuid=uuid,
                exception="ValueError('boom')",
                traceback="Traceback (most recent call last):\nValueError: boom",
            )
        elif kind == "retry":
            emit(
                "task-retried",
                worker,
                ts + 0.5,
                uuid=uuid,
                exception="Retry('later')",
                traceback="Traceback ...",
            )
        elif kind == "progress":
            emit("task-progress", worker, ts + 0.3, uuid=uuid, result="50%")
    now = time.time()
    for worker in WORKERS:
        last = now - 1 if worker != "celery@Gamma" else t0
        emit(
            "worker-online",
            worker,
            last - 0.5,
            freq=2.0,
            active=0,
            processed=0,
            loadavg=[0.1, 0.1, 0.1],
            sw_ident="py-celery",
            sw_ver="5.7.0",
            sw_sys="Linux",
        )
        # the live ones stay alive for 2 x freq (celery's rule) after the events are made, at
        # import time in some modules: an hour, so that a long run before their tests
        # changes nothing
        emit(
            "worker-heartbeat",
            worker,
            last,
            freq=60.0 if worker == "celery@Gamma" else 3600.0,
            active=1,
            processed=5,
            loadavg=[0.2, 0.1, 0.1],
            sw_ident="py-celery",
            sw_ver="5.7.0",
            sw_sys="Linux",
        )
    events.sort(key=lambda e: e["timestamp"])
    return events
