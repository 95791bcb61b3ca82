"""The Lua prelude (``shared/scripts.py``): its tables, evaluated by Redis, equal the Python
definitions, and the scripts under ``shared/lua/`` spell none of those constants themselves."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
from importlib import resources
from typing import Any

import pytest
import redis
from celery import states as celery_states
from celery.events import state as celery_event_state

from shared import events, keys, scripts
from tests.support.replies import text
from tests.support.servers import ROOT

SCRIPTS = sorted(
    p.name.removesuffix(".lua")
    for p in resources.files("shared").joinpath("lua").iterdir()
    if p.name.endswith(".lua")
)


def lua_file(name: str) -> str:
    return resources.files("shared").joinpath("lua", f"{name}.lua").read_text()


def evaluated(r: redis.Redis, lua: str) -> Any:
    """What a chunk ``return``s, through cjson (a reply drops a table's string keys)."""
    return json.loads(text(r.eval(lua, 0)))


def full_prelude() -> str:
    """The prelude of a script mentioning every name."""
    return scripts.prelude(" ".join(scripts.definitions()))


def test_tables_evaluated_by_redis_equal_the_python_definitions(r: redis.Redis) -> None:
    names = sorted(scripts.definitions())
    got = evaluated(
        r, full_prelude() + " return cjson.encode({" + ", ".join(f"{n} = {n}" for n in names) + "})"
    )
    assert got["KEY"] == dataclasses.asdict(keys.SUFFIXES)
    assert got["HIDDEN"] == dataclasses.asdict(keys.HIDDEN)
    assert got["SEP"] == keys.SEP
    assert got["SUBJECT_STATE"] == events.TASK_EVENT_TO_STATE
    assert got["SUBJECT_STATE"] == celery_event_state.TASK_EVENT_TO_STATE
    assert got["STATE"] == {s: s for s in events.TASK_EVENT_TO_STATE.values()}
    bits = got["FIELD_BIT"]
    assert sorted(bits, key=bits.get) == list(events.TASK_EVENT_FIELDS)
    assert sorted(bits.values()) == [1 << i for i in range(len(events.TASK_EVENT_FIELDS))]
    assert set(got) == set(names)


def test_precedence_is_celerys_unknown_states_included(r: redis.Redis) -> None:
    """apply_events.lua's ``PRECEDENCE[state] or UNKNOWN_PRECEDENCE`` is celery's
    ``states.precedence``, for every state celery knows and for custom ones."""
    probes = [s for s in celery_states.PRECEDENCE if s] + ["PROGRESS", "custom", "IGNORED"]
    lua = full_prelude() + (
        " local out = {} for i, s in ipairs(ARGV) do"
        " out[i] = PRECEDENCE[s] or UNKNOWN_PRECEDENCE end return cjson.encode(out)"
    )
    got = json.loads(text(r.eval(lua, 0, *probes)))
    assert got == [celery_states.precedence(s) for s in probes]
    assert "IGNORED" not in celery_states.PRECEDENCE_LOOKUP  # so it probes the unknown rank


def test_every_shard_key_is_built_from_its_suffix() -> None:
    """Shard spells no suffix of its own: each key is prefix + a SUFFIXES value + arguments."""
    shard = keys.Keys("ns", 3).all_shards[1]
    suffixes = set(dataclasses.asdict(keys.SUFFIXES).values())
    built = 0
    for name, member in inspect.getmembers(type(shard)):
        if name.startswith("_") or name == "prefix":
            continue
        if isinstance(member, property):
            key, args = getattr(shard, name), []
        elif inspect.isfunction(member):
            args = [f"<{p}>" for p in list(inspect.signature(member).parameters)[1:]]
            key = member(shard, *args)
        else:
            continue
        rest = key.removeprefix(shard.prefix)
        assert any(rest == s + ":".join(args) for s in suffixes), (name, key)
        built += 1
    assert built == len(suffixes)


_TOKEN = re.compile(
    r"""--\[(?P<ceq>=*)\[.*?\](?P=ceq)\]"""  # long comment
    r"""|--[^\n]*"""  # line comment
    r"""|\[(?P<seq>=*)\[(?P<long>.*?)\](?P=seq)\]"""  # long string
    r"""|'(?P<sq>(?:\\.|[^'\\\n])*)'"""
    r'|"(?P<dq>(?:\\.|[^"\\\n])*)"',
    re.DOTALL,
)


def string_literals(lua: str) -> list[str]:
    """The string literals of a Lua text, comments skipped (escapes left as written)."""
    found = []
    for m in _TOKEN.finditer(lua):
        for group in ("long", "sq", "dq"):
            if m.group(group) is not None:
                found.append(m.group(group))
    return found


def code(lua: str) -> str:
    """The Lua text with comments and strings blanked out."""
    return _TOKEN.sub(" ", lua)


def test_literals_are_found() -> None:
    sample = "local a = 'x' -- 'comment'\nlocal b = \"y\\\"z\" --[[ 'no' ]] local c = [[w]]"
    assert string_literals(sample) == ["x", 'y\\"z', "w"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_spell_no_key_suffix_or_state(name: str) -> None:
    defined = scripts.definitions()
    suffixes = dataclasses.asdict(keys.SUFFIXES).values()
    state_names = set(events.TASK_EVENT_TO_STATE.values())
    hidden = set(dataclasses.asdict(keys.HIDDEN).values())
    lua = lua_file(name)
    spelled = [s for s in string_literals(lua) if s in suffixes or s in state_names or s in hidden]
    assert not spelled, f"{name}.lua spells {spelled}: use the prelude's KEY.x / STATE.X / HIDDEN.x"
    body = code(lua)
    # the prelude's names are not redefined, and every member used exists
    for each in defined:
        assert not re.search(rf"\blocal\s+{each}\b", body), (name, each)
    for table, member in re.findall(r"\b([A-Z_]+)\.([A-Za-z_]\w*)", body):
        if table in defined:
            value = defined[table]
            assert isinstance(value, dict) and member in value, f"{name}.lua: {table}.{member}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_source_is_the_prelude_then_the_file_line_for_line(name: str, r: redis.Redis) -> None:
    lua = lua_file(name)
    source = scripts.source(name)
    head = scripts.prelude(lua)
    assert source == (f"{head} {lua}" if head else lua)
    # Redis's user_script:<line> errors point at the file's lines
    assert len(source.splitlines()) == len(lua.splitlines())
    assert source.splitlines()[1:] == lua.splitlines()[1:]
    # only what the script mentions
    for each in scripts.definitions():
        assert (f"local {each} =" in head) == bool(re.search(rf"\b{each}\b", lua)), each
    r.script_load(source)  # it compiles


def test_lua_literal() -> None:
    assert scripts.lua_literal("a'b\\c\x1f9") == "'a\\'b\\\\c\\0319'"
    assert scripts.lua_literal({"b": 2, "a": 1, "end": 3, "x-y": 4}) == (
        "{ a = 1, b = 2, ['end'] = 3, ['x-y'] = 4 }"
    )


def test_the_script_sha_is_the_same_in_every_process() -> None:
    """A replica or another collector loads the same SHA: nothing depends on hash seeds."""
    program = (
        "import hashlib; from shared import scripts; "
        "print(' '.join(hashlib.sha1(scripts.source(n).encode()).hexdigest() "
        f"for n in {SCRIPTS!r}))"
    )
    mine = " ".join(hashlib.sha1(scripts.source(n).encode()).hexdigest() for n in SCRIPTS)
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == mine.split()
