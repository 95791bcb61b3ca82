"""Redaction: the rules are pure functions (plain unit tests); through the collector's decoder
and ``apply_events.lua`` into a real Redis, in any arrival order, no secret is stored: not in
a task hash, the stream, the pub/sub message, nor any other key."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest
import redis

from services.collector.writer import Writer
from shared.redaction import MARKER, RedactionError, Redactor, parse_fields
from shared.scripts import lua_pattern
from shared.settings import Settings, SettingsError, load
from tests.support import readback
from tests.support.replies import entries

#: in no task, redacted by key; the billing task's own args and result (redacted by name)
SECRETS = ("hunter2", "tok-123")
BILLING = ("card-4242", "swordfish")
KEYS = "password,*token*"
FIELDS = "billing.*=result+args,auth.login=kwargs"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{'user': 'bob', 'password': 'hunter2'}", "{'user': 'bob', 'password': " + MARKER + "}"),
        (
            "('a', {'x': [1, {'api_token': (1, 2)}]}, 3)",
            "('a', {'x': [1, {'api_token': " + MARKER + "}]}, 3)",
        ),
        # a value that is not a literal, a key in capitals
        (
            "{'PASSWORD': datetime.datetime(2020, 1, 1), 'b': 1}",
            "{'PASSWORD': " + MARKER + ", 'b': 1}",
        ),
        # a key that only contains a pattern's text, a value that does: left alone
        ("{'passwords_seen': 1, 'a': 'password'}", "{'passwords_seen': 1, 'a': 'password'}"),
        # cut short by celery (or unreadable) and mentioning a pattern: all of it
        ("{'password': 'unterminated", MARKER),
        ("('no secrets here',)", "('no secrets here',)"),
        # keyword arguments in a repr, JSON or a repr passed as a string
        ("(Creds(password='x', user='u'),)", "(Creds(password=" + MARKER + ", user='u'),)"),
        (
            '(\'{"password": "x", "a": 1}\',)',
            repr(('{"password": ' + MARKER + ', "a": 1}',)),
        ),
        # wildcards inside a pattern
        (
            "{'api_key': 's', 'passXword': 1}",
            "{'api_key': " + MARKER + ", 'passXword': " + MARKER + "}",
        ),
    ],
)
def test_key_patterns_in_repr_text(text: str, expected: str) -> None:
    assert Redactor.from_settings(KEYS + ",api*key,pass?word", "").text(text) == expected


def test_json_values_and_name_rules() -> None:
    r = Redactor.from_settings(KEYS, FIELDS)
    assert r.value({"password": "x", "n": [{"my_token": 1}]}) == {
        "password": MARKER,
        "n": [{"my_token": MARKER}],
    }
    event = {"name": "billing.charge", "args": "('card-4242',)", "kwargs": "{'password': 'p'}"}
    assert r.event(event) == (True, {})
    assert event == {
        "name": "billing.charge",
        "args": MARKER,
        "kwargs": "{'password': " + MARKER + "}",
    }
    # no name carried: what a name rule may replace is held back for the merge
    succeeded = {"uuid": "u", "result": "{'token': 'tok-123'}"}
    assert r.event(succeeded) == (True, {"result": "{'token': " + MARKER + "}"})
    assert "result" not in succeeded
    assert lua_pattern("billing.*") == "^billing%..*$" and lua_pattern("a?b") == "^a.b$"


@pytest.mark.parametrize("bad", ["billing.*", "x=", "=args", "x=args+password", "b[ai]=args"])
def test_bad_rules_stop_the_service(bad: str) -> None:
    with pytest.raises(RedactionError):
        parse_fields(bad)
    with pytest.raises(SettingsError, match="POLLEN_REDACT_FIELDS"):
        load({"POLLEN_REDACT_FIELDS": bad})


def lifecycle(uuid: str, name: str, t: float) -> list[dict[str, Any]]:
    common = {"uuid": uuid, "clock": 1, "pid": 1}
    return [
        {
            "type": "task-received",
            "hostname": "w@h",
            "timestamp": t,
            "name": name,
            "args": "('card-4242', 2)",
            "kwargs": "{'password': 'hunter2', 'user': 'bob', 'auth': {'api_token': 'tok-123'}}",
            "retries": 0,
            **common,
        },
        {"type": "task-started", "hostname": "w@h", "timestamp": t + 1, **common},
        {
            "type": "task-succeeded",
            "hostname": "w@h",
            "timestamp": t + 2,
            "result": "{'session': 'swordfish', 'token': 'tok-123', 'ok': True}",
            "runtime": 0.5,
            **common,
        },
    ]


def readback_stream(r: redis.Redis, writer: Writer) -> list[bytes]:
    return [
        fields[b"e"]
        for shard in writer.keys.all_shards
        for _, fields in entries(r.xrange(shard.stream))
    ]


def everything(r: redis.Redis) -> bytes:
    """Every byte Redis holds, of every key (a dump of the whole database)."""
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"hash":
            out.append(repr(r.hgetall(key)))
        elif kind == b"stream":
            out.append(repr(r.xrange(key)))
        elif kind == b"zset":
            out.append(repr(r.zrange(key, 0, -1, withscores=True)))
        elif kind == b"set":
            out.append(repr(r.smembers(key)))
        elif kind == b"string":
            out.append(repr(r.get(key)))
    return "\n".join(out).encode()


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_no_secret_reaches_redis_in_any_order(
    r: redis.Redis, settings: Settings, order: tuple[int, ...]
) -> None:
    s = msgspec.structs.replace(settings, redact_keys=KEYS, redact_fields=FIELDS)
    writer = Writer(r, s)
    events = lifecycle("bill-1", "billing.charge", 100.0) + lifecycle(
        "plain-1", "plain.task", 200.0
    )
    pubsub = r.pubsub()
    pubsub.subscribe(writer.keys.events_channel)
    subscribed = pubsub.get_message(timeout=5)
    assert subscribed is not None and subscribed["type"] == "subscribe"
    for i in order:
        readback.apply(writer, [events[i], events[i + 3]])
    lines: list[bytes] = []  # one pub/sub message per script call, a line per event
    while (message := pubsub.get_message(timeout=1)) is not None:
        lines.extend(message["data"].split(b"\n"))
    published = b"\n".join(lines)
    pubsub.close()
    stored = everything(r)
    for secret in SECRETS:
        assert secret.encode() not in stored, secret
        assert secret.encode() not in published, secret
    # the billing task's events, as streamed and published, carry none of its secrets
    for line in [*lines, *readback_stream(r, writer)]:
        if b"bill-1" in line:
            assert not any(secret.encode() in line for secret in BILLING), line
    bill = readback.task(r, writer.keys, "bill-1")
    plain = readback.task(r, writer.keys, "plain-1")
    assert bill is not None and plain is not None
    assert bill["args"] == MARKER and bill["result"] == MARKER
    assert plain["args"] == "('card-4242', 2)"
    assert plain["kwargs"] == (
        "{'password': " + MARKER + ", 'user': 'bob', 'auth': {'api_token': " + MARKER + "}}"
    )
    if order.index(2) > order.index(0):
        # the name was known when the result came: the plain task keeps its result (keys
        # redacted); before it, the held result fails closed
        assert plain["result"] == "{'session': 'swordfish', 'token': " + MARKER + ", 'ok': True}"
    else:
        assert plain["result"] == MARKER


def test_exception_class_kept_when_the_exception_is_held(
    r: redis.Redis, settings: Settings
) -> None:
    """A task-failed carries no name: an exception rule holds the text back for the merge, and
    the failure still counts under its exception class."""
    s = msgspec.structs.replace(settings, redact_fields="billing.*=exception+traceback")
    writer = Writer(r, s)
    common = {"clock": 1, "pid": 1, "hostname": "w@h", "uuid": "b1"}
    received = {"type": "task-received", "timestamp": 1.0, "name": "billing.charge", "retries": 0}
    failed = {
        "type": "task-failed",
        "timestamp": 2.0,
        "exception": "KeyError('card-4242')",
        "traceback": "Traceback: card-4242",
    }
    readback.apply(writer, [{**received, **common}, {**failed, **common}])
    task = readback.task(r, writer.keys, "b1")
    assert task is not None and task["exception"] == MARKER and task["traceback"] == MARKER
    assert b"card-4242" not in everything(r)
    fields = r.hgetall(writer.keys.all_shards[0].failures)
    assert any(b"KeyError" in f for f in fields), fields


def test_malformed_samples_show_no_values_while_redaction_is_on() -> None:
    from services.collector.decode import Decoder

    bad = (
        b'{"type": "task-received", "uuid": 5, "hostname": "h", "timestamp": 1,'
        b" \"kwargs\": \"{'password': 'hunter2'}\"}"
    )
    plain = Decoder(32768).decode(bad, "application/json", "utf-8", 1.0).bad
    assert plain and b"hunter2" in plain[0].sample  # as before, without redaction
    redacting = Decoder(32768, Redactor.from_settings(KEYS, "")).decode(
        bad, "application/json", "utf-8", 1.0
    )
    (one,) = redacting.bad
    assert b"hunter2" not in one.sample and b"kwargs" in one.sample
