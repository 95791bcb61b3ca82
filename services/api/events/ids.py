"""Stream ids (``<ms>-<seq>``) as the relay compares them, and cursors (one id per shard)."""

from __future__ import annotations

import re

StreamId = tuple[int, int]
Positions = tuple[StreamId | None, ...]
#: A stream id: ASCII digits, each part below 2**64 (Redis refuses anything else).
_ID_RE = re.compile(r"^([0-9]{1,20})(?:-([0-9]{1,20}))?$")


def parse_id(text: str) -> StreamId:
    m = _ID_RE.match(text)
    if m is None:
        raise ValueError(text)
    ms, seq = int(m.group(1)), int(m.group(2) or 0)
    if ms >= 2**64 or seq >= 2**64:
        raise ValueError(text)
    return ms, seq


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"
