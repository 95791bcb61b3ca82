"""What a client asks for: its event filter, its resume position and its batching."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from aiohttp import web

from services.api import params
from services.api.errors import bad_param
from services.api.events.ids import StreamId, parse_id
from shared.events import StreamEvent

#: Largest ``batch=`` in milliseconds.
MAX_BATCH_MS = 10_000


@dataclass(frozen=True, slots=True)
class EventFilter:
    types: tuple[str, ...] = ()
    uuids: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    workers: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()
    _types_re: re.Pattern[str] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.types:
            pattern = "|".join(f"(?:{fnmatch.translate(t)})" for t in self.types)
            object.__setattr__(self, "_types_re", re.compile(pattern))

    def match(self, ev: StreamEvent) -> bool:
        if self._types_re is not None and self._types_re.match(ev.type) is None:
            return False
        if self.uuids and ev.uuid not in self.uuids:
            return False
        if self.names and ev.task_name not in self.names:
            return False
        if self.workers and ev.hostname not in self.workers:
            return False
        return not self.states or ev.task_state in self.states


def parse_filter(request: web.Request) -> EventFilter:
    types = params.listed(request.query, "type")
    event_type = request.match_info.get("event_type")
    if event_type:
        types = [event_type if event_type.startswith("task-") else f"task-{event_type}"]
    uuids = params.listed(request.query, "uuid")
    if request.match_info.get("uuid"):
        uuids = [request.match_info["uuid"]]
    for t in types:
        if len(t) > 100:
            raise bad_param("type", "event type pattern too long")
    return EventFilter(
        tuple(sorted(set(types))),
        frozenset(uuids),
        frozenset(params.listed(request.query, "taskname")),
        frozenset(params.listed(request.query, "worker")),
        frozenset(params.listed(request.query, "state")),
    )


def parse_since(request: web.Request, shards: int) -> list[StreamId] | None:
    raw = request.query.get("since")
    if raw is None or not raw.strip():
        return None
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) not in (1, shards):
        raise bad_param("since", f"expected 1 or {shards} comma-separated stream ids")
    try:
        ids = [parse_id(p) for p in parts]
    except ValueError:
        raise bad_param("since", f"expected stream ids like 1700000000000-0, got {raw!r}") from None
    return ids * shards if len(ids) == 1 else ids


def parse_batch(request: web.Request) -> float:
    """``batch=<ms>`` in seconds (0: one message per event)."""
    ms = params.integer(request.query, "batch", 0, minimum=1, maximum=MAX_BATCH_MS)
    assert ms is not None
    return ms / 1000
