"""Retention by task name: ``POLLEN_TASK_RETENTION`` keeps some tasks shorter (or not at all)
and others longer than ``POLLEN_TASK_TTL`` / ``POLLEN_FAILED_TASK_TTL``.

``<task name pattern>=<states>:<how long>,...``, the first rule that matches a task's name and
state wins:

- states: ``success`` (SUCCESS), ``failure`` (FAILURE), ``all``, or a state's name
  (``REVOKED``, a custom one);
- how long, after the task's last event: seconds, or with a unit (``90s``, ``30m``, ``12h``,
  ``90d``), ``0`` (not kept: gone at the next age check, within a second) or ``forever``.

Examples: ``proj.heartbeat.*=success:0`` (successes of a chatty task are not kept),
``billing.*=failure:90d`` (its failures kept three months), ``reports.*=all:1d``.
``apply_events.lua`` applies them in its age check, with the patterns as Lua patterns.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from shared.scripts import lua_pattern

#: How long a rule's ``forever`` is, as ``apply_events.lua`` takes it.
FOREVER = -1
_STATES = {"success": "SUCCESS", "failure": "FAILURE", "all": "*"}
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_STATE = re.compile(r"^[A-Z][A-Z0-9_]*$")


class RetentionError(ValueError):
    """A ``POLLEN_TASK_RETENTION`` rule that cannot be read (the message says why)."""


def parse(text: str) -> tuple[tuple[str, str, int], ...]:
    """``((task name pattern, state or '*', seconds or FOREVER), ...)``."""
    rules = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pattern, sep, rest = part.partition("=")
        states, colon, how_long = rest.partition(":")
        if not sep or not colon or not pattern.strip():
            raise RetentionError(f"{part!r}: expected <task name pattern>=<states>:<how long>")
        if any(c in pattern for c in "[]"):
            raise RetentionError(f"{part!r}: task name patterns take * and ? only, not [...]")
        state = _STATES.get(states.strip().lower(), states.strip())
        if state != "*" and not _STATE.match(state):
            raise RetentionError(
                f"{part!r}: states must be success, failure, all or a state name (REVOKED...)"
            )
        how_long = how_long.strip().lower()
        if how_long == "forever":
            seconds = FOREVER
        else:
            match = _DURATION.match(how_long)
            if match is None:
                raise RetentionError(
                    f"{part!r}: how long must be seconds, with s/m/h/d, 0 or forever"
                )
            seconds = int(match.group(1)) * _UNITS[match.group(2)]
        rules.append((pattern.strip(), state, seconds))
    return tuple(rules)


@cache
def lua_rules(text: str) -> list[list[Any]]:
    """The rules as ``apply_events.lua`` takes them: ``[[Lua pattern, state or '*', seconds]]``."""
    return [[lua_pattern(pattern), state, seconds] for pattern, state, seconds in parse(text)]
