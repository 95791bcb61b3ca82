"""Query-string parameters: each parser names the parameter in its 400."""

from __future__ import annotations

import datetime
import math
import time

from aiohttp import web

from services.api.errors import bad_param

_TRUE = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE = frozenset({"n", "no", "f", "false", "off", "0"})
DATE_FORMAT = "%Y-%m-%d %H:%M"


def text(request: web.Request, name: str, *, all_is_none: bool = False) -> str | None:
    """A string parameter; empty (and, for Flower's filters, ``All``) means absent."""
    value = request.query.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value or (all_is_none and value == "All"):
        return None
    return value


#: Largest integer a parameter takes (what JSON numbers and Redis scores hold exactly).
MAX_INTEGER = 2**53


def integer(
    request: web.Request,
    name: str,
    default: int | None,
    minimum: int = 0,
    maximum: int = MAX_INTEGER,
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw.strip() == "":
        return default
    expected = f"expected an integer from {minimum} to {maximum}, got {raw[:40]!r}"
    try:
        value = int(raw.strip())
    except ValueError:
        raise bad_param(name, expected) from None
    if not minimum <= value <= maximum:
        raise bad_param(name, expected)
    return value


def number(request: web.Request, name: str, default: float | None) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise bad_param(name, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise bad_param(name, f"expected a finite number, got {raw!r}")
    return value


def boolean(request: web.Request, name: str, default: bool) -> bool:
    """Flower's booleans: y/yes/t/true/on/1 and n/no/f/false/off/0."""
    raw = request.query.get(name)
    if raw is None or raw.strip() == "":
        return default
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise bad_param(name, f"expected a boolean (true/false, 1/0, yes/no...), got {raw!r}")


def moment(request: web.Request, name: str) -> float | None:
    """Flower's ``YYYY-MM-DD HH:MM`` in the server's local time (as Flower's ``time.mktime``),
    or unix seconds."""
    raw = text(request, name)
    if raw is None:
        return None
    try:
        return float(raw) if _is_number(raw) else _local(raw)
    except (ValueError, OverflowError):
        raise bad_param(
            name, f"expected 'YYYY-MM-DD HH:MM' (server local time) or unix seconds, got {raw!r}"
        ) from None


def _is_number(raw: str) -> bool:
    try:
        value = float(raw)
    except ValueError:
        return False
    return math.isfinite(value)


def _local(raw: str) -> float:
    return time.mktime(datetime.datetime.strptime(raw, DATE_FORMAT).timetuple())


def time_range(request: web.Request, start: str, end: str) -> tuple[float, float] | None:
    lo, hi = moment(request, start), moment(request, end)
    if lo is None and hi is None:
        return None
    return (-math.inf if lo is None else lo, math.inf if hi is None else hi)
