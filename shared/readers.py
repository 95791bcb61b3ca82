"""Tasks and workers as readers see them, built from the hashes the collector writes.

Pure functions over what Redis returned, shared by the API and the tests, so that both read
the data model the same way. Hash values are JSON text; hidden fields start with ``_``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from shared.events import TASK_FIELDS, WORKER_EVENT_FIELDS
from shared.keys import HIDDEN

#: celery's ``Worker.freq`` before any worker event is seen, and its expire window (200 %).
DEFAULT_FREQ = 60.0
EXPIRE_WINDOW = 2.0

_decode = msgspec.json.decode
_NULL = b"null"
_HB = HIDDEN.heartbeat.encode()
_HBTS = HIDDEN.heartbeat_ts.encode()
_OFFLINE = HIDDEN.offline_ts.encode()
_ONLINE = HIDDEN.online_ts.encode()

Hash = Mapping[bytes, bytes]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: Where each field of celery's ``Task.as_dict()`` (but ``children``, kept in sets) comes from:
#: ``(field, hash field, JSON when absent)``, in ``as_dict()`` order.
TASK_JSON_SOURCES: tuple[tuple[str, str, bytes], ...] = tuple(
    (
        field,
        {"root": "root_id", "parent": "parent_id"}.get(field, field),
        {"clock": b"0", "state": b'"PENDING"'}.get(field, _NULL),
    )
    for field in TASK_FIELDS
    if field != "children"
)


#: Pollen's own task fields, after celery's and only while set: a lost task has ``lost`` (true)
#: and ``lost_at``, the death of its worker that lost it (``apply_events.lua``).
LOST_FIELDS = ("lost", "lost_at")


def task_json_fields(h: Hash, children: Iterable[str]) -> list[tuple[str, bytes]]:
    """``(field, JSON text)`` of celery's ``Task.as_dict()`` in its order, ``worker`` being the
    hostname, then ``LOST_FIELDS`` when set; no decoding, so that values can be spliced into
    a response."""
    out = [(field, h.get(source.encode(), default)) for field, source, default in TASK_JSON_SOURCES]
    out.append(("children", msgspec.json.encode(sorted(children))))
    out.extend((f, h[f.encode()]) for f in LOST_FIELDS if f.encode() in h)
    return out


def task_from_hash(h: Hash, children: Iterable[str] = ()) -> dict[str, Any]:
    """The task as a dict, equal to celery's ``Task.as_dict()`` with ``worker`` a hostname."""
    return {field: _decode(value) for field, value in task_json_fields(h, children)}


def worker_last_heartbeat(h: Hash, task_seen: float | None) -> float | None:
    """celery's ``Worker.heartbeats[-1]``: the newest heartbeat since the last worker-offline.

    Worker events count with their receive time; task events (``task_seen``, the newest task
    event timestamp from that worker) with their sender time, as in ``State._event``.
    """
    hb = _time(h, _HB)
    offline = _time(h, _OFFLINE)
    if task_seen is not None and (offline is None or task_seen > offline):
        hb = task_seen if hb is None else max(hb, task_seen)
    return hb


def _time(h: Hash, field: bytes) -> float | None:
    raw = h.get(field)
    return None if raw is None else float(raw)


def worker_offline_ts(h: Hash) -> float | None:
    """Sender time of the worker's newest worker-offline."""
    return _time(h, _OFFLINE)


def worker_online_ts(h: Hash) -> float | None:
    """Sender time of the worker's newest worker-online."""
    return _time(h, _ONLINE)


def worker_last_word(h: Hash, task_seen: float | None) -> float | None:
    """The newest thing the worker said, in its own clock: a heartbeat, a task event or a
    worker-offline (sender times, comparable with its tasks' event timestamps)."""
    times = [t for t in (_time(h, _HBTS), _time(h, _OFFLINE), task_seen) if t is not None]
    return max(times) if times else None


def worker_freq(h: Hash) -> float:
    raw = h.get(b"freq")
    if raw is None:
        return DEFAULT_FREQ
    value = _decode(raw)
    return float(value) if isinstance(value, int | float) else DEFAULT_FREQ


def worker_alive(h: Hash, task_seen: float | None, now: float) -> bool:
    """celery's ``Worker.alive``: a heartbeat newer than ``now - 2 * freq``."""
    last = worker_last_heartbeat(h, task_seen)
    return last is not None and now < last + worker_freq(h) * EXPIRE_WINDOW


def heartbeat_active(h: Hash) -> int | None:
    """Tasks the worker says it is executing (``active`` of its newest worker event; Flower's
    executing gauge); None before any."""
    raw = h.get(b"active")
    value = None if raw is None else _decode(raw)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def worker_from_hash(hostname: str, h: Hash, task_seen: float | None, now: float) -> dict[str, Any]:
    """The worker's event fields (celery's ``Worker`` fields), liveness and last heartbeat."""
    out: dict[str, Any] = {field: None for field in WORKER_EVENT_FIELDS}
    for field in WORKER_EVENT_FIELDS:
        raw = h.get(field.encode())
        if raw is not None:
            out[field] = _decode(raw)
    out["hostname"] = hostname
    out["freq"] = worker_freq(h)
    if out["clock"] is None:
        out["clock"] = 0
    last = worker_last_heartbeat(h, task_seen)
    out["last_heartbeat"] = last
    out["alive"] = last is not None and now < last + out["freq"] * EXPIRE_WINDOW
    return out


def decode_hash(h: Mapping[bytes, bytes]) -> dict[str, Any]:
    """Public fields of a hash, JSON-decoded (hidden ``_`` fields dropped)."""
    return {_text(k): _decode(v) for k, v in h.items() if not k.startswith(b"_")}
