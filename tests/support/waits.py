"""The wait times a list of Celery events gives, whatever the order it came in: the reference
the queue-health tests hold the collector's ``wait`` histograms to (``apply_events.lua``'s
wait rule, docs/api.md).

Per task and attempt: queue = task-received - (the task-sent of the same ``retries``, or its
eta when later); prefetch = task-started - (the task-received before it, or its eta when
later); at least 0; labelled by the latest task-sent's queue ('' without one) and the task's name.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

from shared.events import eta_timestamp
from shared.keys import WAIT_BUCKETS

WaitKey = tuple[str, str, str]
_RANK = {"task-sent": 0, "task-received": 1, "task-started": 2}


def expected_waits(events: list[dict[str, Any]]) -> dict[WaitKey, list[float]]:
    """``(stage, queue, task name) -> seconds`` of every wait in ``events``."""
    per_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event.get("type", "").startswith("task-") and "uuid" in event:
            per_task[event["uuid"]].append(event)
    out: dict[WaitKey, list[float]] = defaultdict(list)
    for task_events in per_task.values():
        task_events.sort(key=lambda e: (e["timestamp"], _RANK.get(e["type"], 3)))
        sent: dict[Any, dict[str, Any]] = {}
        queue = ""
        for e in task_events:
            if e["type"] == "task-sent":
                sent.setdefault(e.get("retries"), e)
            if "queue" in e:  # the latest event that carries one, as every task field
                queue = e["queue"] or ""
        name = next((e["name"] for e in task_events if e.get("name")), "")
        received: dict[str, Any] | None = None
        for e in task_events:
            if e["type"] == "task-received":
                received = e
                s = sent.get(e.get("retries"))
                if s is not None:
                    eta = eta_timestamp(e.get("eta")) or eta_timestamp(s.get("eta"))
                    due = max(s["timestamp"], eta or 0.0)
                    out[("queue", queue, name)].append(max(0.0, e["timestamp"] - due))
            elif e["type"] == "task-started" and received is not None:
                due = max(received["timestamp"], eta_timestamp(received.get("eta")) or 0.0)
                out[("prefetch", queue, name)].append(max(0.0, e["timestamp"] - due))
                received = None
    return dict(out)


def bucket_counts(seconds: list[float]) -> list[int]:
    """Counts per bucket of ``WAIT_BUCKETS`` plus ``+Inf`` (not cumulative), as the API."""
    counts = [0] * (len(WAIT_BUCKETS) + 1)
    for value in seconds:
        counts[bisect.bisect_left(WAIT_BUCKETS, value)] += 1
    return counts
