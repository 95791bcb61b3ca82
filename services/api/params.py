"""Request parameters, the one parser of every route: each reads a mapping of names to strings
(``request.query``, or ``arguments(request)`` for the control endpoints, which read the form
body too as Flower does) and names the parameter in its 400."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiDictProxy, MultiMapping

from services.api.errors import bad_param

_TRUE = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE = frozenset({"n", "no", "f", "false", "off", "0"})
DATE_FORMAT = "%Y-%m-%d %H:%M"
#: Largest integer a parameter takes (what JSON numbers and Redis scores hold exactly).
MAX_INTEGER = 2**53
#: Largest magnitude of a delay or limit in seconds (ten years): beyond it Celery's date
#: arithmetic overflows.
MAX_SECONDS = 10 * 365 * 86400

Args = Mapping[str, str]


async def arguments(request: web.Request) -> MultiDict[str]:
    """Query string and form body together, as Flower's ``get_argument`` reads them."""
    merged: MultiDict[str] = MultiDict(request.query)
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form: MultiDictProxy[Any] = await request.post()
        for key, value in form.items():
            if isinstance(value, str):
                merged.add(key, value)
    return merged


def text(args: Args, name: str, *, all_is_none: bool = False) -> str | None:
    """A string parameter; empty (and, for Flower's filters, ``All``) means absent."""
    value = args.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value or (all_is_none and value == "All"):
        return None
    return value


def required(args: Args, name: str) -> str:
    """A string parameter that must be given (as sent: not stripped)."""
    value = args.get(name)
    if not value:
        raise bad_param(name, "required")
    return value


def choice(args: Args, name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` (case-insensitive); ``default`` when absent or empty."""
    value = (args.get(name) or "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise bad_param(name, f"invalid {name} {value!r}, expected one of {', '.join(choices)}")
    return value


def listed(args: MultiMapping[str], name: str) -> list[str]:
    """A repeatable parameter, each value also comma-separated: ``a=x&a=y,z`` is x, y, z."""
    return [v.strip() for raw in args.getall(name, []) for v in raw.split(",") if v.strip()]


def integer(
    args: Args,
    name: str,
    default: int | None,
    minimum: int = 0,
    maximum: int = MAX_INTEGER,
    *,
    needed: bool = False,
) -> int | None:
    """An integer within ``minimum..maximum``; absent: ``default`` (a 400 when ``needed``)."""
    raw = args.get(name)
    if raw is None or raw.strip() == "":
        if needed:
            raise bad_param(name, "required")
        return default
    expected = f"expected an integer from {minimum} to {maximum}, got {raw[:40]!r}"
    try:
        value = int(raw.strip())
    except ValueError:
        raise bad_param(name, expected) from None
    if not minimum <= value <= maximum:
        raise bad_param(name, expected)
    return value


def number(args: Args, name: str, default: float | None) -> float | None:
    raw = args.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise bad_param(name, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise bad_param(name, f"expected a finite number, got {raw!r}")
    return value


def seconds(name: str, value: Any, *, negative: bool = False) -> float:
    """A finite number of seconds within ``MAX_SECONDS`` (400 otherwise), from a parameter or
    a JSON body value."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise bad_param(name, f"not a number: {value!r}") from None
    if not math.isfinite(number) or abs(number) > MAX_SECONDS:
        raise bad_param(name, f"must be a finite number of seconds within {MAX_SECONDS}")
    if number < 0 and not negative:
        raise bad_param(name, "must not be negative")
    return number


def duration(args: Args, name: str) -> float | None:
    """``seconds`` of a parameter; absent: None."""
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    return seconds(name, raw)


def boolean(args: Args, name: str, default: bool) -> bool:
    """Flower's booleans: y/yes/t/true/on/1 and n/no/f/false/off/0."""
    raw = args.get(name)
    if raw is None or raw.strip() == "":
        return default
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise bad_param(name, f"expected a boolean (true/false, 1/0, yes/no...), got {raw!r}")


def moment(args: Args, name: str) -> float | None:
    """Flower's ``YYYY-MM-DD HH:MM`` in the server's local time (as Flower's ``time.mktime``),
    or unix seconds."""
    raw = text(args, name)
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


def time_range(args: Args, start: str, end: str) -> tuple[float, float] | None:
    lo, hi = moment(args, start), moment(args, end)
    if lo is None and hi is None:
        return None
    return (-math.inf if lo is None else lo, math.inf if hi is None else hi)
