"""Hypothesis strategies for realistic Celery event streams (task lifecycles and heartbeats).

Events come out in emission order, with increasing timestamps and per-sender Lamport clocks,
as celery's EventDispatcher produces them.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

WORKERS = ("celery@alpha", "celery@beta", "celery@gamma")
CLIENT = "client@app"
NAMES = ("tasks.add", "tasks.mul", "proj.reports.build")
QUEUES = ("celery", "reports")
BASE_TS = 1_790_000_000.0

Event = dict[str, Any]


def etas() -> st.SearchStrategy[str | None]:
    """No eta, or one in the minute after BASE_TS as celery sends it (isoformat, UTC)."""
    iso = st.floats(0, 60, allow_nan=False).map(
        lambda s: datetime.fromtimestamp(BASE_TS + round(s, 3), UTC).isoformat()
    )
    return st.one_of(st.none(), st.none(), iso)


@st.composite
def task_events(draw: st.DrawFn, uuid: str, parent: str | None, root: str) -> list[Event]:
    """One task's events: optional task-sent, 1-3 attempts on workers, custom events."""
    name = draw(st.sampled_from(NAMES))
    args = draw(st.sampled_from(["()", "(1, 2)", "('x',)", "[" + "9" * 40 + "]"]))
    kwargs = draw(st.sampled_from(["{}", "{'a': 1}", "{'user': 'bob'}"]))
    queue = draw(st.sampled_from(QUEUES))
    # one eta for every attempt: with an eta on some attempts only, Flower's prefetch time
    # (flower_task_prefetch_time_seconds, latest value wins) depends on the arrival order
    eta = draw(etas())
    common = {
        "name": name,
        "args": args,
        "kwargs": kwargs,
        "root_id": root,
        "parent_id": parent,
        "eta": None,
        "expires": None,
    }
    out: list[Event] = []
    if draw(st.booleans()):
        out.append(
            {
                "type": "task-sent",
                "hostname": CLIENT,
                "retries": 0,
                "queue": queue,
                "exchange": "",
                "routing_key": queue,
                **common,
                "eta": eta,
            }
        )
    attempts = draw(st.integers(1, 3))
    for attempt in range(attempts):
        worker = draw(st.sampled_from(WORKERS))
        last = attempt == attempts - 1
        out.append(
            {"type": "task-received", "hostname": worker, "retries": attempt, **common, "eta": eta}
        )
        if draw(st.integers(0, 9)) == 0:
            out.append({"type": "task-rejected", "hostname": worker, "requeue": False})
            if last:
                break
        if draw(st.integers(0, 9)) == 0:
            out.append(
                {
                    "type": "task-revoked",
                    "hostname": worker,
                    "terminated": False,
                    "signum": None,
                    "expired": False,
                }
            )
            break
        out.append({"type": "task-started", "hostname": worker})
        for _ in range(draw(st.integers(0, 2))):
            out.append(
                {
                    "type": "task-progress",
                    "hostname": worker,
                    "result": draw(st.sampled_from(["10%", "50%", None])),
                }
            )
        outcome = draw(
            st.sampled_from(
                ["succeeded", "failed", "retried"]
                if not last
                else ["succeeded", "failed", "none", "revoked"]
            )
        )
        if outcome == "succeeded":
            out.append(
                {
                    "type": "task-succeeded",
                    "hostname": worker,
                    "result": draw(st.sampled_from(["3", "None", "'ok'"])),
                    "runtime": draw(st.floats(0.0001, 30, allow_nan=False)),
                }
            )
        elif outcome == "failed":
            out.append(
                {
                    "type": "task-failed",
                    "hostname": worker,
                    "exception": "ValueError('boom')",
                    "traceback": "Traceback (most recent call last):\n  ...\nValueError: boom",
                }
            )
        elif outcome == "retried":
            out.append(
                {
                    "type": "task-retried",
                    "hostname": worker,
                    "exception": "Retry('later')",
                    "traceback": "Traceback ...",
                }
            )
        elif outcome == "revoked":
            out.append(
                {
                    "type": "task-revoked",
                    "hostname": worker,
                    "terminated": True,
                    "signum": 15,
                    "expired": False,
                }
            )
        if outcome == "succeeded" and draw(st.integers(0, 5)) == 0:
            # a late retry after success (celery: RETRY overwrites SUCCESS, in order too)
            out.append(
                {
                    "type": "task-retried",
                    "hostname": worker,
                    "exception": "Retry()",
                    "traceback": "",
                }
            )
    for event in out:
        event["uuid"] = uuid
    return out


@st.composite
def worker_events(draw: st.DrawFn, hostname: str) -> list[Event]:
    out: list[Event] = []
    common = {"hostname": hostname, "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}
    if draw(st.booleans()):
        out.append(
            {
                "type": "worker-online",
                "freq": 2.0,
                "active": 0,
                "processed": 0,
                "loadavg": [0.0, 0.0, 0.0],
                **common,
            }
        )
    processed = 0
    for _ in range(draw(st.integers(0, 4))):
        processed += draw(st.integers(0, 5))
        if draw(st.integers(0, 4)) == 0:
            # the `heartbeat` control command: freq 5, no load fields
            out.append({"type": "worker-heartbeat", "freq": 5.0, **common})
        else:
            out.append(
                {
                    "type": "worker-heartbeat",
                    "freq": 2.0,
                    "active": draw(st.integers(0, 4)),
                    "processed": processed,
                    "loadavg": [0.5, 0.25, 0.1],
                    **common,
                }
            )
    # (a worker-offline before any other event of that worker is a documented divergence:
    # celery drops it, Pollen records the offline worker; see docs/semantics.md)
    if out and draw(st.integers(0, 3)) == 0:
        out.append(
            {
                "type": "worker-offline",
                "freq": 2.0,
                "active": 0,
                "processed": processed,
                "loadavg": [0.1, 0.1, 0.1],
                **common,
            }
        )
        if draw(st.booleans()):
            out.append(
                {
                    "type": "worker-online",
                    "freq": 2.0,
                    "active": 0,
                    "processed": 0,
                    "loadavg": [0.0, 0.0, 0.0],
                    **common,
                }
            )
    return out


@st.composite
def cluster_stream(draw: st.DrawFn) -> list[Event]:
    """Several tasks (some children of others) and worker events, interleaved in time."""
    count = draw(st.integers(1, 4))
    uuids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(count)]
    streams: list[list[Event]] = []
    for i, uuid in enumerate(uuids):
        parent = uuids[draw(st.integers(0, i - 1))] if i and draw(st.booleans()) else None
        root = uuids[0] if parent else uuid
        streams.append(draw(task_events(uuid, parent, root)))
    for hostname in WORKERS[: draw(st.integers(0, len(WORKERS)))]:
        streams.append(draw(worker_events(hostname)))
    # interleave: each stream keeps its own order
    order = draw(st.permutations([i for i, s in enumerate(streams) for _ in s]))
    positions = [0] * len(streams)
    merged: list[Event] = []
    for i in order:
        merged.append(streams[i][positions[i]])
        positions[i] += 1
    # stamp times and clocks in emission order
    clocks = dict.fromkeys([*WORKERS, CLIENT], 0)
    ts = BASE_TS
    for event in merged:
        ts += draw(st.floats(0.001, 3.0, allow_nan=False))
        clocks[event["hostname"]] += 1
        event["timestamp"] = round(ts, 6)
        event["clock"] = clocks[event["hostname"]]
        event["pid"] = 4242
        event["utcoffset"] = 0
    # a client stamps task-sent after publishing the task, so a fast worker's events may carry
    # earlier timestamps than the task-sent that (logically, and in emission order) precedes them
    for i, event in enumerate(merged):
        if event["type"] == "task-sent" and draw(st.integers(0, 3)) == 0:
            later = [e for e in merged[i + 1 :] if e.get("uuid") == event["uuid"]][:3]
            if later:
                event["timestamp"] = round(draw(st.sampled_from(later))["timestamp"] + 1e-4, 6)
    return merged


def with_local_received(events: list[Event], delay: float = 0.01) -> list[Event]:
    """The events as celery's EventReceiver hands them to State: with ``local_received``."""
    return [dict(e, local_received=round(e["timestamp"] + delay, 6)) for e in events]


def chunks(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    it = iter(items)
    out: list[list[Any]] = []
    for size in itertools.cycle(sizes or [1]):
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return out
        out.append(chunk)
    return out
