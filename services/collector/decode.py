"""Message bodies to typed events, straight from the bytes when the body is JSON.

A bad event never raises: it is reported with a reason and a sample, and the rest of the
message is still decoded. Oversize string fields are truncated (and reported), not dropped.
Task events are redacted here (``shared/redaction.py``), before the normalized JSON is made:
what is redacted never reaches Redis, the stream or a subscriber.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from kombu import serialization
from kombu.exceptions import SerializerNotInstalled

from shared import events as ev
from shared.redaction import FIELDS, Redactor

JSON_TYPES = frozenset({"application/json", "text/json", ""})
#: Content types kombu may decode for us; pickle is refused (events come from the network).
OTHER_TYPES = frozenset({"application/x-msgpack", "application/x-yaml"})

_known = msgspec.json.Decoder(ev.KnownEvent)
_task_custom = msgspec.json.Decoder(ev.TaskCustom)
_worker_custom = msgspec.json.Decoder(ev.WorkerCustom)
_type_only = msgspec.json.Decoder(ev.TypeOnly)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_raw_one = msgspec.json.Decoder(msgspec.Raw)
_any = msgspec.json.Decoder()
_encode = msgspec.json.encode


#: Every reason a bad event is counted under (``<ns>:malformed``, the malformed metric).
REASONS = frozenset(
    {
        "undecodable",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "invalid_value",
        "unknown_type",
        "missing_type",
        "invalid_type",
        "unsupported_content_type",
    }
)


@dataclass(slots=True)
class Decoded:
    """One valid event and its normalized JSON, still open (no closing brace)."""

    event: ev.TaskEvent | ev.WorkerEvent
    open_json: bytes
    local_received: float
    #: Fields held back for ``apply_events.lua`` to redact by the task's name (an event that
    #: does not carry it): field -> JSON text; they are in neither ``event`` nor ``open_json``.
    held: dict[str, bytes] | None = None


@dataclass(slots=True)
class Bad:
    reason: str
    sample: bytes


@dataclass(slots=True)
class DecodeResult:
    events: list[Decoded] = field(default_factory=list)
    bad: list[Bad] = field(default_factory=list)
    #: Events kept after truncating fields longer than the limit.
    truncated: int = 0


def _reason(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    if message.startswith("Object missing required field"):
        return "missing_field"
    if message.startswith("Expected") and not any(c in message for c in ("length", ">", "<")):
        return "wrong_type"
    return "invalid_value"


_REDACTABLE = tuple(f'"{f}"'.encode() for f in FIELDS)


class Decoder:
    def __init__(self, max_field_bytes: int, redactor: Redactor | None = None) -> None:
        self.max_field_bytes = max_field_bytes
        self.redactor = redactor if redactor is not None and redactor.active else None

    def decode(
        self, body: bytes, content_type: str, content_encoding: str, local_received: float
    ) -> DecodeResult:
        result = DecodeResult()
        if content_type not in JSON_TYPES:
            body_or_none = self._to_json(body, content_type, content_encoding, result)
            if body_or_none is None:
                return result
            body = body_or_none
        try:
            stripped = body.lstrip()
            if stripped[:1] == b"[":
                raws = _raw_list.decode(body)
            elif stripped[:1] == b"{":
                raws = [_raw_one.decode(body)]
            else:
                result.bad.append(Bad("not_an_object", self._sample(body)))
                return result
        except (msgspec.DecodeError, msgspec.ValidationError):
            result.bad.append(Bad("undecodable", self._sample(body)))
            return result
        for raw in raws:
            self._one(bytes(raw), local_received, result)
        return result

    def _to_json(
        self, body: bytes, content_type: str, content_encoding: str, result: DecodeResult
    ) -> bytes | None:
        if content_type not in OTHER_TYPES:
            result.bad.append(Bad("unsupported_content_type", content_type.encode()[:512]))
            return None
        try:
            if content_type == "application/x-msgpack":
                payload = msgspec.msgpack.decode(body)
            else:
                payload = serialization.loads(
                    body, content_type, content_encoding, accept={content_type}
                )
            return _encode(payload)
        except SerializerNotInstalled:
            result.bad.append(Bad("unsupported_content_type", content_type.encode()[:512]))
            return None
        except Exception:  # any codec error: the body is bad, the collector is fine
            result.bad.append(Bad("undecodable", self._sample(body)))
            return None

    def _one(self, raw: bytes, local_received: float, result: DecodeResult) -> None:
        if len(raw) > self.max_field_bytes:
            shortened = self._truncate(raw)
            if shortened is not raw:
                result.truncated += 1
                raw = shortened
        try:
            event: ev.TaskEvent | ev.WorkerEvent = _known.decode(raw)
        except msgspec.ValidationError as exc:
            try:
                decoded = self._custom(raw)
            except _Bad as bad:
                result.bad.append(Bad(bad.reason, self._sample(raw)))
                return
            if decoded is None:
                result.bad.append(Bad(_reason(exc), self._sample(raw)))
                return
            event = decoded
        except msgspec.DecodeError:
            result.bad.append(Bad("undecodable", self._sample(raw)))
            return
        if not raw.endswith(b"}"):
            result.bad.append(Bad("not_an_object", self._sample(raw)))
            return
        # keys the collector adds, or that readers filter on, must not come from the sender in
        # another shape (a worker event carrying "uuid": 5 would fail readers' StreamEvent)
        reserved = _RESERVED_IN_WORKER if isinstance(event, ev.WorkerEvent) else _RESERVED
        if any(key in raw for key in reserved):
            raw = _without(raw, reserved)
        held = None
        if (
            self.redactor is not None
            and isinstance(event, ev.TaskEvent)
            and any(key in raw for key in _REDACTABLE)
        ):
            obj = _any.decode(raw)
            changed, kept = self.redactor.event(obj)
            if changed:
                raw = _encode(obj)
                event = self._task(raw)
                held = {k: _encode(v) for k, v in kept.items()} or None
        open_json = raw[:-1] + b',"local_received":' + _encode(local_received)
        result.events.append(Decoded(event, open_json, local_received, held))

    def _sample(self, raw: bytes) -> bytes:
        """What is kept of a malformed event (in Redis and the log): its start, or, while
        redaction is on, only its field names (its values may hold what is redacted)."""
        if self.redactor is None:
            return raw[:512]
        try:
            obj = _any.decode(raw)
        except msgspec.DecodeError:
            return b"(not shown: redaction is on)"
        if not isinstance(obj, dict):
            return b"(not shown: redaction is on)"
        return _encode({"fields (values not shown: redaction is on)": sorted(obj)})[:512]

    @staticmethod
    def _task(raw: bytes) -> ev.TaskEvent:
        """A task event decoded again after redaction (its fields changed, not its shape)."""
        try:
            event = _known.decode(raw)
        except msgspec.ValidationError:
            return _task_custom.decode(raw)
        assert isinstance(event, ev.TaskEvent)
        return event

    def _custom(self, raw: bytes) -> ev.TaskCustom | ev.WorkerCustom | None:
        """Decode a ``task-<x>`` / ``worker-<x>`` outside the standard types; None when the
        type is a standard one (then the first error stands)."""
        try:
            kind = _type_only.decode(raw).type
        except msgspec.ValidationError:
            raise _Bad("missing_type") from None
        group, _, subject = kind.partition("-")
        if group not in ("task", "worker"):
            raise _Bad("unknown_type")
        if not ev.SUBJECT_RE.match(subject):
            raise _Bad("invalid_type")
        if kind in _STANDARD_TYPES:
            return None
        try:
            if group == "task":
                return _task_custom.decode(raw)
            return _worker_custom.decode(raw)
        except msgspec.ValidationError as exc:
            raise _Bad(_reason(exc)) from None

    def _truncate(self, raw: bytes) -> bytes:
        try:
            obj = _any.decode(raw)
        except msgspec.DecodeError:
            return raw
        if not isinstance(obj, dict):
            return raw
        changed = False
        limit = self.max_field_bytes
        for key, value in obj.items():
            shortened = _shorten(value, limit)
            if shortened is not value:
                obj[key] = shortened
                changed = True
        return _encode(obj) if changed else raw


#: Keys of a normalized event (shared.events.StreamEvent) that the collector sets itself.
_RESERVED = (b'"local_received"', b'"task_name"', b'"task_state"', b'"stream_id"')
_RESERVED_IN_WORKER = (*_RESERVED, b'"uuid"')


def _without(raw: bytes, keys: tuple[bytes, ...]) -> bytes:
    """The event's JSON without those keys (rare: only when the raw text mentions one)."""
    obj = _any.decode(raw)
    for key in keys:
        obj.pop(key[1:-1].decode(), None)
    return _encode(obj)


class _Bad(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


_STANDARD_TYPES = frozenset(
    [f"task-{s}" for s in ev.TASK_EVENT_TO_STATE]
    + ["worker-online", "worker-heartbeat", "worker-offline"]
)


def _shorten(value: Any, limit: int) -> Any:
    """A string over ``limit`` bytes is cut, marked, and kept; other values as they are,
    except containers whose encoding exceeds the limit, which become their truncated repr."""
    if isinstance(value, str):
        data = value.encode()
        if len(data) <= limit:
            return value
        cut = data[:limit].decode(errors="ignore")
        return f"{cut}... [truncated {len(data) - len(cut.encode())} bytes]"
    if isinstance(value, list | dict) and len(_encode(value)) > limit:
        return _shorten(repr(value), limit)
    return value
