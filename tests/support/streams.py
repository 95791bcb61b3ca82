"""Publish synthetic task lifecycles through celery's own EventDispatcher, as workers do."""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

from celery import Celery

LIFECYCLE = ("task-received", "task-started", "task-succeeded")


def lifecycle(uuid: str, hostname: str, i: int) -> Iterator[tuple[str, dict[str, Any]]]:
    yield (
        "task-received",
        {
            "uuid": uuid,
            "name": f"bench.task{i % 5}",
            "args": f"({i},)",
            "kwargs": "{}",
            "retries": 0,
            "eta": None,
            "expires": None,
            "root_id": uuid,
            "parent_id": None,
        },
    )
    yield "task-started", {"uuid": uuid}
    yield "task-succeeded", {"uuid": uuid, "result": str(i), "runtime": 0.001 * (i % 100)}


def publish_tasks(
    broker_url: str,
    count: int,
    hostname: str = "gen@bench",
    batched: bool = True,
    per_second: float | None = None,
    uuids: list[str] | None = None,
) -> list[str]:
    """Send ``count`` task lifecycles (3 events each); returns the task ids."""
    app = Celery(broker=broker_url)
    ids = uuids if uuids is not None else [str(uuidlib.uuid4()) for _ in range(count)]
    started = time.monotonic()
    with app.connection_for_write() as conn:
        options: dict[str, Any] = {"buffer_group": ["task"], "buffer_limit": 24} if batched else {}
        dispatcher = app.events.Dispatcher(conn, hostname=hostname, enabled=True, **options)
        for i, uuid in enumerate(ids):
            for kind, fields in lifecycle(uuid, hostname, i):
                dispatcher.send(kind, **fields)
            if per_second and i % 50 == 0:
                ahead = (i / per_second) - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        dispatcher.flush()
        dispatcher.close()
    return ids
