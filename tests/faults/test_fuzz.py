"""Malformed events, fuzzed: the decoder over arbitrary bytes and mutated Celery events, and the
collector's apply path (``Writer.apply`` + ``apply_events.lua`` on a real Redis) over mutated
events that still decode. Nothing raises, every element of a message is either decoded or
counted as bad with a known reason, and whatever is applied reads back.

The same decoder is fuzzed coverage-guided by atheris (``tools/fuzz_decoder.py``) when
atheris is installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.collector.decode import REASONS, Decoder, DecodeResult
from services.collector.writer import Writer
from shared import readers
from shared.events import StreamEvent
from shared.keys import Keys
from shared.settings import Settings
from tests.support import readback
from tests.support.lifecycles import cluster_stream
from tests.support.replies import entries, raw_list
from tests.support.servers import PYTHON, ROOT

CONTENT_TYPES = (
    "application/json",
    "",
    "text/json",
    "application/x-msgpack",
    "application/x-yaml",
    "application/x-python-serialize",
    "application/data",
    "text/plain; charset=utf-8",
)
MAX_FIELD = 2048

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
#: Values at the edges of what the apply path handles: huge, tiny, negative, separators and
#: hash-tag characters in names, non-ASCII, long text.
edge_values = st.sampled_from(
    [
        0,
        -1,
        2**53 + 1,
        2**63 - 1,
        -(2**63),
        1e308,
        -1e308,
        5e-324,
        0.0,
        "",
        "\x1f",
        "a\x1fb",
        "{tag}",
        "}{",
        "x:y:z",
        "ünï©ødé ☃",
        "\x00",
        "x" * 600,
        "y" * (MAX_FIELD + 10),
        [],
        {},
        [1.5, "a", None],
        {"nested": {"deep": [1, 2, 3]}},
        None,
        True,
    ]
)
FIELDS = (
    "type",
    "uuid",
    "hostname",
    "timestamp",
    "clock",
    "name",
    "args",
    "kwargs",
    "result",
    "runtime",
    "retries",
    "exception",
    "traceback",
    "parent_id",
    "root_id",
    "freq",
    "active",
    "processed",
    "loadavg",
    "utcoffset",
    "pid",
    "eta",
    "expires",
)


@st.composite
def mutated_events(draw: st.DrawFn, values: st.SearchStrategy[Any] = json_values) -> list[Any]:
    """A real event stream with some events mutated: fields dropped, set to other values,
    added; whole events replaced by other JSON values."""
    events: list[Any] = [dict(e) for e in draw(cluster_stream())]
    for i in draw(st.lists(st.integers(0, len(events) - 1), max_size=6)):
        event = events[i]
        if not isinstance(event, dict):
            continue
        action = draw(st.integers(0, 4))
        if action == 0 and event:
            del event[draw(st.sampled_from(sorted(event)))]
        elif action in (1, 2):
            event[draw(st.sampled_from(FIELDS))] = draw(values)
        elif action == 3:
            event[draw(st.text(min_size=1, max_size=10))] = draw(values)
        else:
            events[i] = draw(values)
    return events


def check_accounting(result: DecodeResult, elements: int | None) -> None:
    for bad in result.bad:
        assert bad.reason in REASONS, bad
        assert len(bad.sample) <= 512
    for decoded in result.events:
        json.loads(decoded.open_json + b"}")  # the normalized event is valid JSON
    if elements is not None:
        # every element of the message is either decoded or counted as bad, once
        assert len(result.events) + len(result.bad) == elements, (result, elements)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=2048), content_type=st.sampled_from(CONTENT_TYPES))
def test_decoder_arbitrary_bytes(body: bytes, content_type: str) -> None:
    result = Decoder(MAX_FIELD).decode(body, content_type, "utf-8", 1.0)
    check_accounting(result, None)
    if not result.events and not result.bad:
        # nothing decoded and nothing counted: only an empty batch may say nothing
        assert content_type in ("application/json", "", "text/json", "application/x-msgpack")
        assert json.loads(msgspec.json.encode(msgspec.json.decode(body.strip() or b"0"))) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=mutated_events(), as_list=st.booleans(), msgpack=st.booleans())
def test_decoder_mutated_events(events: list[Any], as_list: bool, msgpack: bool) -> None:
    decoder = Decoder(MAX_FIELD)
    if not as_list:
        events = events[:1]
    payload: Any = events if as_list else events[0]
    if msgpack:
        try:
            body, content_type = msgspec.msgpack.encode(payload), "application/x-msgpack"
        except OverflowError:  # msgpack has no ints beyond 64 bits: nothing to send
            assume(False)
    else:
        body, content_type = json.dumps(payload).encode(), "application/json"
    result = decoder.decode(body, content_type, "binary", 1.0)
    if as_list or isinstance(payload, dict):
        check_accounting(result, len(events))
    else:
        check_accounting(result, 1 if not isinstance(payload, list) else None)


@pytest.fixture
def writer(r: redis.Redis, settings: Settings) -> Writer:
    return Writer(r, settings)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(events=mutated_events(edge_values), twice=st.booleans())
def test_apply_mutated_events(
    r: redis.Redis, writer: Writer, settings: Settings, events: list[Any], twice: bool
) -> None:
    """Whatever the decoder lets through, the apply path takes: no Redis or Lua error, every
    event applied or recognised as a duplicate, and the state reads back as tasks, workers
    and stream events."""
    r.flushdb()
    decoder = Decoder(MAX_FIELD)
    result = decoder.decode(json.dumps(events).encode(), "application/json", "utf-8", 2.0)
    check_accounting(result, len(events))
    applied = writer.apply(result.events, now=1_790_000_100.0)
    assert applied.applied + applied.duplicates == len(result.events)
    if twice:  # a redelivery changes nothing
        again = writer.apply(result.events, now=1_790_000_100.0)
        assert (again.applied, again.duplicates) == (0, len(result.events))
    # retention after (edge timestamps make tasks ancient: a redelivery after their eviction
    # would rightly apply them again)
    writer.apply([], now=1_790_000_100.0, age_check=True)
    keys = Keys(settings.namespace)
    shard = keys.all_shards[0]
    for uuid in raw_list(r.zrange(shard.by_timestamp, 0, -1)):
        task = readback.task(r, keys, uuid.decode())
        assert task is not None and task["uuid"] == uuid.decode()
        assert task["state"]
    for host in raw_list(r.zrange(shard.workers, 0, -1)):
        readback.worker(r, keys, host.decode(), now=1_790_000_100.0)
    for host in raw_list(r.zrange(shard.seen, 0, -1)):
        readers.worker_alive({}, r.zscore(shard.seen, host), 1_790_000_100.0)
    for _, fields in entries(r.xrange(shard.stream)):
        msgspec.json.decode(fields[b"e"], type=StreamEvent)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (optional: `pip install atheris`); "
    "test_decoder_arbitrary_bytes fuzzes the same decoder with hypothesis",
)
def test_decoder_atheris() -> None:
    """A bounded coverage-guided run of atheris over the decoder (5,000 inputs)."""
    out = subprocess.run(
        [PYTHON, "-m", "tools.fuzz_decoder", "-runs=5000", "-max_len=4096", "-seed=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Done 5000 runs" in out.stderr, out.stderr[-3000:]
