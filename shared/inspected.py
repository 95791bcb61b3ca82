"""What the enabler stores of the workers' inspect answers and the queue samples, and how
readers (the API, the tests) turn it back into Flower's shapes. Every key is named in
``shared/keys.py``; the shapes are documented here and in ``docs/enabler.md``:

``<ns>:inspect:<hostname>`` (hash), per inspect method ``m`` (``INSPECT_METHODS``):
    ``m``          JSON: the worker's latest answer, as ``app.control.inspect().m()`` gives it
                   for that worker
    ``m:time``     JSON number: when that answer arrived (epoch seconds)
    ``m:error``    JSON ``{"error": str, "time": float}``: the latest attempt got no answer (or
                   the worker answered an error); removed by the next answer. The previous
                   answer stays, with its time.
    ``timestamp``  JSON number: the newest answer of any method (Flower's ``timestamp``)
    The key expires ``POLLEN_INSPECT_TTL`` seconds after the worker's last answer.
``<ns>:inspected`` (zset): hostname by the time of its newest answer.
``<ns>:queues`` (hash): queue name -> JSON ``{"name", "messages", "consumers", "time"}``;
    ``consumers`` is null on a Redis broker. Only the queues of the latest sample.
``<ns>:queues:history`` (stream): one entry per minute, id ``<minute start in ms>-0``, field
    ``q`` -> JSON ``{queue name: messages}`` of the first sample of that minute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

#: Inspect methods the enabler refreshes; the first four are Flower's per-worker summary.
INSPECT_METHODS: tuple[str, ...] = (
    "stats",
    "active_queues",
    "registered",
    "conf",
    "active",
    "reserved",
    "scheduled",
    "revoked",
)

_decode = msgspec.json.decode

Hash = Mapping[bytes, bytes]


def worker_inspect(h: Hash) -> dict[str, Any]:
    """Flower's per-worker object of ``/api/workers``: each answered method and ``timestamp``."""
    out: dict[str, Any] = {}
    for method in INSPECT_METHODS:
        raw = h.get(method.encode())
        if raw is not None:
            out[method] = _decode(raw)
    raw_ts = h.get(b"timestamp")
    if raw_ts is not None:
        out["timestamp"] = _decode(raw_ts)
    return out


def inspect_errors(h: Hash) -> dict[str, dict[str, Any]]:
    """``{method: {"error", "time"}}`` for the methods whose latest attempt failed."""
    out: dict[str, dict[str, Any]] = {}
    for method in INSPECT_METHODS:
        raw = h.get(f"{method}:error".encode())
        if raw is not None:
            out[method] = _decode(raw)
    return out


def queue_lengths(h: Hash) -> list[dict[str, Any]]:
    """The samples of ``<ns>:queues``, sorted by queue name."""
    samples = [_decode(v) for v in h.values()]
    return sorted(samples, key=lambda s: str(s.get("name")))


def history_entry(entry_id: bytes | str, fields: Hash) -> dict[str, Any]:
    """One ``<ns>:queues:history`` entry as ``{"time": minute start, "queues": {name: n}}``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms = int(text.split("-", 1)[0])
    return {"time": ms / 1000.0, "queues": _decode(fields[b"q"])}
