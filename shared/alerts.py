"""Alert rules: their schema (a msgspec Struct: schema, validator and codec), the receivers
they deliver to, and the records the enabler keeps. The API edits rules
(``services/api/alerts.py``); the active enabler evaluates them and delivers
(``services/enabler/alerts.py``). Keys: ``<ns>:alerts:rules``, ``<ns>:alerts:state``,
``<ns>:alerts:log`` (``shared/keys.py``).

A rule watches one kind of figure, for every subject its ``match`` pattern selects (a task
name, queue, worker or exception class, by kind), and fires for a subject once the figure
has stood at ``threshold`` or beyond for ``for_seconds``:

==================  ========  ==============================================================
kind                subject   figure
==================  ========  ==============================================================
failure_count       task      task-failed events in the last ``window`` seconds
failure_rate        task      failed / (succeeded + failed) in the window (0..1)
new_exception       class     a class first seen within the window (value: first seen)
queue_length        queue     messages waiting (the enabler's sample)
oldest_message      queue     age in seconds of the oldest waiting message
worker_down         worker    1 while the worker is offline (celery's heartbeat rule)
lost_tasks          task      tasks marked lost now (on workers that died)
runtime             task      the ``percentile`` of runtimes in the window, in seconds
==================  ========  ==============================================================

Receivers come from ``POLLEN_ALERT_RECEIVERS`` (``<name>=<kind>:<url>,...``; kinds ``webhook``
(JSON), ``slack`` (Slack-compatible incoming webhook) and ``alertmanager`` (its API base URL)):
their URLs, which often hold a token, stay in the deployment's settings, never in Redis.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

import msgspec

Kind = Literal[
    "failure_count",
    "failure_rate",
    "new_exception",
    "queue_length",
    "oldest_message",
    "worker_down",
    "lost_tasks",
    "runtime",
]
KINDS: tuple[str, ...] = get_args(Kind)
#: What each kind's ``match`` selects.
SUBJECT = {
    "failure_count": "task",
    "failure_rate": "task",
    "new_exception": "exception",
    "queue_length": "queue",
    "oldest_message": "queue",
    "worker_down": "worker",
    "lost_tasks": "task",
    "runtime": "task",
}
RECEIVER_KINDS = ("webhook", "slack", "alertmanager")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Records kept in ``<ns>:alerts:log`` (firings, resolutions, deliveries), approximately.
LOG_MAXLEN = 10_000


class Rule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: Kind
    #: pattern (``*``, ``?``) of the subjects watched: task names, queues, workers or classes
    match: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] = "*"
    threshold: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    #: seconds of per-minute counters the windowed kinds read (whole minutes, the current one
    #: included)
    window: Annotated[int, msgspec.Meta(ge=60, le=7 * 86400)] = 300
    #: how long the figure must stand at the threshold before the alert fires
    for_seconds: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 0
    percentile: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.95
    severity: Literal["info", "warning", "critical"] = "warning"
    #: names from POLLEN_ALERT_RECEIVERS
    receivers: list[Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]] = []
    description: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    enabled: bool = True


class Alert(msgspec.Struct, kw_only=True):
    """One rule's alert for one subject, pending or firing (``<ns>:alerts:state``), with what
    of its rule it needs to be delivered even after the rule is gone."""

    rule: str
    subject: str
    kind: Kind
    severity: str
    receivers: list[str]
    description: str = ""
    state: Literal["pending", "firing"]
    value: float
    #: when the figure reached the threshold
    since: float
    fired_at: float | None = None
    #: last time it was sent to Alertmanager (which forgets an alert not sent again)
    sent_at: float | None = None


class Receiver(msgspec.Struct, frozen=True):
    name: str
    kind: Literal["webhook", "slack", "alertmanager"]
    url: str


class ReceiverError(ValueError):
    """A ``POLLEN_ALERT_RECEIVERS`` entry that cannot be read (the message says why)."""


def parse_receivers(text: str) -> dict[str, Receiver]:
    out: dict[str, Receiver] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        kind, colon, url = rest.partition(":")
        name, kind, url = name.strip(), kind.strip(), url.strip()
        # the name and kind only: the URL may hold a token
        if not sep or not colon or not NAME_RE.match(name):
            raise ReceiverError(f"entry {len(out) + 1}: expected <name>=<kind>:<url>")
        if kind not in RECEIVER_KINDS:
            raise ReceiverError(f"{name}: kind must be one of {', '.join(RECEIVER_KINDS)}")
        if not url.startswith(("http://", "https://")):
            raise ReceiverError(f"{name}: the URL must be http:// or https://")
        out[name] = Receiver(name, kind, url)  # type: ignore[arg-type]
    return out


def alert_field(rule: str, subject: str) -> str:
    """The ``<ns>:alerts:state`` field of a rule's alert for a subject."""
    return f"{rule}\x1f{subject}"
