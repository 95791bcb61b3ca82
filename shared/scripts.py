"""The Lua scripts in ``shared/lua/``, loaded once per client.

Each script opens with a comment that documents every key it touches. ``source(name)`` puts a
prelude before it, generated from the Python definitions, so that no script spells a key
suffix, a state or a field order of its own:

==================  ===================================================================
Lua name            from
==================  ===================================================================
KEY                 ``shared.keys.SUFFIXES``: ``P .. KEY.idx_state .. state``
HIDDEN              ``shared.keys.HIDDEN``: hidden hash fields, ``HIDDEN.state == '_s'``
SEP                 ``shared.keys.SEP``, the separator inside composite hash fields
MAX_DEATHS          ``shared.keys.MAX_DEATHS``, deaths kept per worker and shard
WAIT_BUCKETS        ``shared.keys.WAIT_BUCKETS``: the bounds' labels (``repr``), ascending
WAIT_STAGE          ``shared.keys.WAIT_STAGES`` by name: ``WAIT_STAGE.queue == 'queue'``
SUBJECT_STATE       ``shared.events.TASK_EVENT_TO_STATE``: event subject -> state
STATE               its states by name: ``STATE.RETRY == 'RETRY'``
PRECEDENCE          ``celery.states.PRECEDENCE_LOOKUP``: state -> rank (lower wins)
UNKNOWN_PRECEDENCE  the rank celery gives a state it does not know (custom states)
FIELD_BIT           ``shared.events.TASK_EVENT_FIELDS``: field -> bit, in that order
==================  ===================================================================

A script gets only the names it mentions. The prelude is one line, sorted, so the script's
SHA is the same in every process and Redis's ``user_script:<line>`` errors keep the file's
line numbers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from celery import states as celery_states
from redis.commands.core import Script

from shared import events, keys

LuaScalar = str | int
LuaValue = LuaScalar | Mapping[str, LuaScalar] | tuple[str, ...]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LUA_RESERVED = frozenset(
    ("and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in",
     "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while")
)  # fmt: skip


def definitions() -> dict[str, LuaValue]:
    """Every name the prelude can define, with its value, from the one Python definition."""
    precedence: dict[str, int] = {
        state: rank for state, rank in celery_states.PRECEDENCE_LOOKUP.items() if state is not None
    }
    return {
        "KEY": dataclasses.asdict(keys.SUFFIXES),
        "HIDDEN": dataclasses.asdict(keys.HIDDEN),
        "SEP": keys.SEP,
        "MAX_DEATHS": keys.MAX_DEATHS,
        "WAIT_BUCKETS": tuple(repr(b) for b in keys.WAIT_BUCKETS),
        "WAIT_STAGE": {stage: stage for stage in keys.WAIT_STAGES},
        "SUBJECT_STATE": dict(events.TASK_EVENT_TO_STATE),
        "STATE": {state: state for state in events.TASK_EVENT_TO_STATE.values()},
        "PRECEDENCE": precedence,
        "UNKNOWN_PRECEDENCE": int(celery_states.PRECEDENCE_LOOKUP[None]),
        "FIELD_BIT": {field: 1 << i for i, field in enumerate(events.TASK_EVENT_FIELDS)},
    }


def _string(text: str) -> str:
    # printable ASCII as is, anything else as a 3-digit decimal escape (valid in every Lua; a
    # shorter one would swallow a digit after it)
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char in "\\'":
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return "'" + "".join(out) + "'"


def _key(name: str) -> str:
    if _IDENTIFIER.match(name) and name not in _LUA_RESERVED:
        return name
    return f"[{_string(name)}]"


def lua_literal(value: LuaValue) -> str:
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):
        return "{ " + ", ".join(lua_literal(v) for v in value) + " }"
    items = ", ".join(f"{_key(k)} = {lua_literal(v)}" for k, v in sorted(value.items()))
    return "{ " + items + " }"


def prelude(script: str) -> str:
    """The ``local`` definitions ``script`` mentions, on one line, sorted by name."""
    used = [
        f"local {name} = {lua_literal(value)}"
        for name, value in sorted(definitions().items())
        if re.search(rf"\b{name}\b", script)
    ]
    return " ".join(used)


@cache
def source(name: str) -> str:
    """The script as Redis runs it: its prelude, then (on the same line) the file's text."""
    text = resources.files("shared").joinpath("lua", f"{name}.lua").read_text()
    head = prelude(text)
    return f"{head} {text}" if head else text


def register(client: Any, name: str) -> Script:
    """A callable script bound to ``client`` (sync, asyncio or cluster; EVALSHA with reload)."""
    script: Script = client.register_script(source(name))
    return script


def lua_pattern(glob: str) -> str:
    """An ``fnmatch`` pattern (``*``, ``?``; no brackets: the settings refuse them) as an
    anchored Lua pattern. ``?`` is one byte in Lua, one character in Python: the same for the
    ASCII names celery tasks have."""
    out = []
    for char in glob:
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char.isalnum() or char in "_ ":
            out.append(char)
        else:
            out.append("%" + char)
    return "^" + "".join(out) + "$"
