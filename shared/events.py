"""Celery events as typed msgspec Structs: the schema, the validator and the codec at once.

A field that an event does not carry stays ``UNSET`` (distinct from an explicit null): celery's
merge writes every field an event carries, nulls included, and nothing else.

Also here: ``StreamEvent``, the shape of the normalized events the collector appends to the
Redis stream and publishes, as read by the API.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, UnsetType

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
Opt = UnsetType

#: Subjects of task events celery maps to states (``celery.events.state.TASK_EVENT_TO_STATE``).
TASK_EVENT_TO_STATE: dict[str, str] = {
    "sent": "PENDING",
    "received": "RECEIVED",
    "started": "STARTED",
    "failed": "FAILURE",
    "retried": "RETRY",
    "succeeded": "SUCCESS",
    "revoked": "REVOKED",
    "rejected": "REJECTED",
}

#: Task fields an event may write (celery's ``Task._fields`` minus those celery computes:
#: uuid, state, timestamp, clock, worker, client, children, root/parent and the per-type times),
#: then Pollen's own ``queue`` (task-sent's: the label of the wait histograms; stored, not in
#: Flower's task JSON). Append only: a field's position is its bit in the masks
#: ``apply_events.lua`` stores in task hashes (``FIELD_BIT``, ``shared/scripts.py``).
TASK_EVENT_FIELDS: tuple[str, ...] = (
    "name",
    "args",
    "kwargs",
    "eta",
    "expires",
    "retries",
    "result",
    "exception",
    "runtime",
    "traceback",
    "exchange",
    "routing_key",
    "root_id",
    "parent_id",
    "queue",
)

#: Fields of a task as Flower returns it (``Task.as_dict()`` with ``worker`` as hostname).
TASK_FIELDS: tuple[str, ...] = (
    "uuid",
    "name",
    "state",
    "received",
    "sent",
    "started",
    "rejected",
    "succeeded",
    "failed",
    "retried",
    "revoked",
    "args",
    "kwargs",
    "eta",
    "expires",
    "retries",
    "worker",
    "result",
    "exception",
    "timestamp",
    "runtime",
    "traceback",
    "exchange",
    "routing_key",
    "clock",
    "client",
    "root",
    "root_id",
    "parent",
    "parent_id",
    "children",
)

#: Worker fields set from worker events (celery's ``Worker._fields`` minus heartbeats).
WORKER_EVENT_FIELDS: tuple[str, ...] = (
    "hostname",
    "pid",
    "freq",
    "clock",
    "active",
    "processed",
    "loadavg",
    "sw_ident",
    "sw_ver",
    "sw_sys",
)

SUBJECT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Envelope(msgspec.Struct, kw_only=True):
    """What every Celery event carries besides its ``type``."""

    hostname: Text
    timestamp: float
    clock: int = 0
    pid: int | Opt | None = UNSET
    utcoffset: int | float | Opt | None = UNSET


class _TaskFields(Envelope, kw_only=True):
    uuid: Text
    # Every field a task event may write, UNSET unless the event carries it. Standard events
    # carry a fixed subset; custom ``task-*`` events may carry any of them.
    name: str | Opt | None = UNSET
    args: Any | Opt = UNSET
    kwargs: Any | Opt = UNSET
    eta: Any | Opt = UNSET
    expires: Any | Opt = UNSET
    retries: int | Opt | None = UNSET
    result: Any | Opt = UNSET
    exception: Any | Opt = UNSET
    runtime: float | Opt | None = UNSET
    traceback: Any | Opt = UNSET
    exchange: str | Opt | None = UNSET
    routing_key: str | Opt | None = UNSET
    root_id: str | Opt | None = UNSET
    parent_id: str | Opt | None = UNSET
    queue: str | Opt | None = UNSET


def _tagged(tag: str) -> dict[str, Any]:
    return {"tag_field": "type", "tag": tag}


class TaskSent(_TaskFields, **_tagged("task-sent")):
    pass


class TaskReceived(_TaskFields, **_tagged("task-received")):
    pass


class TaskStarted(_TaskFields, **_tagged("task-started")):
    pass


class TaskSucceeded(_TaskFields, **_tagged("task-succeeded")):
    pass


class TaskFailed(_TaskFields, **_tagged("task-failed")):
    pass


class TaskRetried(_TaskFields, **_tagged("task-retried")):
    pass


class TaskRejected(_TaskFields, **_tagged("task-rejected")):
    requeue: bool | Opt | None = UNSET


class TaskRevoked(_TaskFields, **_tagged("task-revoked")):
    terminated: bool | Opt | None = UNSET
    signum: Any | Opt = UNSET
    expired: bool | Opt | None = UNSET


class TaskCustom(_TaskFields, kw_only=True):
    """Any other ``task-<subject>`` event (``task-progress``...); celery's state is SUBJECT."""

    type: str


class _WorkerFields(Envelope, kw_only=True):
    freq: float | Opt = UNSET
    active: int | Opt | None = UNSET
    processed: int | Opt | None = UNSET
    loadavg: list[float] | Opt | None = UNSET
    sw_ident: str | Opt | None = UNSET
    sw_ver: str | Opt | None = UNSET
    sw_sys: str | Opt | None = UNSET


class WorkerOnline(_WorkerFields, **_tagged("worker-online")):
    pass


class WorkerHeartbeat(_WorkerFields, **_tagged("worker-heartbeat")):
    pass


class WorkerOffline(_WorkerFields, **_tagged("worker-offline")):
    pass


class WorkerCustom(_WorkerFields, kw_only=True):
    """Any other ``worker-<subject>``: celery's State treats it as a heartbeat."""

    type: str


_StandardTaskEvent = (
    TaskSent
    | TaskReceived
    | TaskStarted
    | TaskSucceeded
    | TaskFailed
    | TaskRetried
    | TaskRejected
    | TaskRevoked
)
_StandardWorkerEvent = WorkerOnline | WorkerHeartbeat | WorkerOffline
TaskEvent = _StandardTaskEvent | TaskCustom
WorkerEvent = _StandardWorkerEvent | WorkerCustom
#: The tagged union a JSON event is decoded into first; other types fall back to the customs.
KnownEvent = _StandardTaskEvent | _StandardWorkerEvent


#: A class name at the start of an exception's repr, as celery sends it in task-failed and
#: task-retried (``safe_repr(exc)``: ``ValueError('boom')``, ``TimeLimitExceeded(60,)``,
#: ``<MyError: boom>``, ``pkg.errors.Timeout: late``).
_EXCEPTION_CLASS_RE = re.compile(r"\s*<?([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")
_EXCEPTION_CLASS_END = frozenset("(:> ")
#: A task-retried's ``exception`` is celery's ``Retry`` itself, ``Retry(<message>, <exc>,
#: <when>)``: the cause is its second argument, when it has one.
_RETRY_CAUSE_RE = re.compile(
    r"(?:celery\.exceptions\.)?Retry\((?:Retry\(\.\.\.\)|None|'[^']*'),\s*"
)
MAX_EXCEPTION_CLASS = 128


def exception_class(exception: Any) -> str | None:
    """The exception class that a task-failed or task-retried ``exception`` names (for a
    retry, the class of its cause), or None: not a string, no leading class name."""
    if not isinstance(exception, str):
        return None
    retry = _RETRY_CAUSE_RE.match(exception)
    if retry is not None:
        cause = _class_at(exception, retry.end())
        if cause is not None:
            return cause
    return _class_at(exception, 0)


def _class_at(text: str, start: int) -> str | None:
    match = _EXCEPTION_CLASS_RE.match(text, start)
    if match is None:
        return None
    name, end = match.group(1), match.end()
    if end < len(text) and text[end] not in _EXCEPTION_CLASS_END:
        return None
    if name == "None" or len(name) > MAX_EXCEPTION_CLASS:
        return None
    return name


def eta_timestamp(eta: Any) -> float | None:
    """Epoch seconds of a task event's ``eta`` (celery sends ``datetime.isoformat()``; a naive
    one is taken as UTC, celery's default), or None: absent, null or not an ISO date."""
    if not isinstance(eta, str):
        return None
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def event_type(event: TaskEvent | WorkerEvent) -> str:
    """The event's ``type`` (``task-succeeded``, ``task-progress``, ``worker-heartbeat``...)."""
    if isinstance(event, TaskCustom | WorkerCustom):
        return event.type
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


class TypeOnly(msgspec.Struct):
    """Just the ``type`` of an event, to route custom types."""

    type: str


def published_events(message: bytes) -> list[bytes]:
    """The events of one ``<ns>:events`` pub/sub message, each its stream entry plus
    ``stream_id``. A message is one ``apply_events.lua`` call: a line ``<stream id> <entry>``
    per event (JSON text holds no raw newline), joined here rather than in Redis, which
    every collector shares; a message that is one JSON text (collectors before that) is one
    event already."""
    if message.startswith(b"{"):
        return [message]
    out = []
    for line in message.split(b"\n"):
        sid, _, entry = line.partition(b" ")
        out.append(entry[:-1] + b',"stream_id":"' + sid + b'"}')
    return out


class StreamEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What readers need of a normalized event (stream entry / pub/sub message).

    The collector writes the event as the sender sent it, plus ``local_received`` (the
    collector's receive time), and for task events ``task_name`` and ``task_state`` (the task's
    name and state after the event was merged). Published events also carry ``stream_id``.
    """

    type: str
    hostname: str = ""
    timestamp: float = 0.0
    local_received: float = 0.0
    uuid: str | None = None
    task_name: str | None = None
    task_state: str | None = None
    stream_id: str | None = None
