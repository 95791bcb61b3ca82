"""redis-py's replies, narrowed to what a client without ``decode_responses`` answers.

redis-py types a reply for both kinds of client: ``bytes | str`` (``str`` when the client
decodes responses), an ``X | None`` where a command can answer nil, a union of shapes where an
option (``withscores``) changes the reply. The tests' clients never decode responses, so their
replies are bytes: these helpers check that at run time and hand the reply on with its type
known, instead of a ``cast`` that would hide a client that decodes after all.
"""

from __future__ import annotations

from typing import NoReturn


def _unexpected(what: str, value: object) -> NoReturn:
    raise TypeError(f"expected {what} from a redis client without decode_responses: {value!r}")


def raw(value: object) -> bytes:
    """A bulk string reply (a key, member, field or value)."""
    if not isinstance(value, bytes):
        _unexpected("bytes", value)
    return value


def text(value: object) -> str:
    """A bulk string reply, decoded (UTF-8)."""
    return raw(value).decode()


def raw_list(value: object) -> list[bytes]:
    """An array of bulk strings (``ZRANGE`` without scores, ``KEYS``, ``LRANGE``...)."""
    if not isinstance(value, list):
        _unexpected("a list", value)
    return [raw(v) for v in value]


def raw_set(value: object) -> set[bytes]:
    """A set of bulk strings (``SMEMBERS``)."""
    if not isinstance(value, set):
        _unexpected("a set", value)
    return {raw(v) for v in value}


def raw_hash(value: object) -> dict[bytes, bytes]:
    """A hash (``HGETALL``): ``{}`` for a missing key."""
    if not isinstance(value, dict):
        _unexpected("a dict", value)
    return {raw(k): raw(v) for k, v in value.items()}


def scored(value: object) -> list[tuple[bytes, float]]:
    """Members with their scores (``ZRANGE ... WITHSCORES``)."""
    if not isinstance(value, list):
        _unexpected("a list", value)
    out: list[tuple[bytes, float]] = []
    for pair in value:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            _unexpected("a (member, score) pair", pair)
        member, score = pair
        if not isinstance(score, float):
            _unexpected("a float score", score)
        out.append((raw(member), score))
    return out


def entries(value: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries (``XRANGE``, ``XREVRANGE``): ``(id, fields)`` in the stream's order."""
    if not isinstance(value, list):
        _unexpected("a list", value)
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for entry in value:
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            _unexpected("an (id, fields) entry", entry)
        sid, fields = entry
        out.append((raw(sid), raw_hash(fields)))
    return out
