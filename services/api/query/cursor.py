"""``X-Pollen-Next-Cursor``: where a page ended (segment, score, member), bound to its query."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import msgspec

_pack = msgspec.msgpack.encode


class CursorError(ValueError):
    """A ``cursor`` that this API did not return for this query (the handler's 400)."""


class CursorData(msgspec.Struct, array_like=True):
    v: int
    shape: bytes
    segment: list[Any]
    score: str
    member: bytes


def encode_cursor(data: CursorData) -> str:
    return base64.urlsafe_b64encode(_pack(data)).rstrip(b"=").decode()


def decode_cursor(text: str, shape: bytes) -> CursorData:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = msgspec.msgpack.decode(raw, type=CursorData)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise CursorError("not a cursor returned by this API") from None
    if data.v != 1:
        raise CursorError("unsupported cursor version")
    if data.shape != shape:
        raise CursorError("was returned for a different query (filters, search or sort)")
    try:
        score = float(data.score)
    except ValueError:
        score = math.nan
    if math.isnan(score) or len(data.member) > 512:
        raise CursorError("not a cursor returned by this API")
    return data
