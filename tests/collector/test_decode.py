"""The decoder is a pure function of bytes: plain unit tests."""

from __future__ import annotations

import json

import msgspec

from services.collector.decode import Decoder, DecodeResult
from shared import events as ev
from shared.events import StreamEvent


def decode(body: bytes, limit: int = 32768, ctype: str = "application/json") -> DecodeResult:
    return Decoder(limit).decode(body, ctype, "utf-8", 123.5)


def test_single_and_batched_bodies() -> None:
    one = {"type": "task-started", "uuid": "u", "hostname": "h", "timestamp": 1.5, "clock": 3}
    assert len(decode(json.dumps(one).encode()).events) == 1
    many = decode(json.dumps([one, dict(one, type="task-succeeded", result="1")]).encode())
    assert [ev.event_type(d.event) for d in many.events] == ["task-started", "task-succeeded"]


def test_raw_timestamp_kept_and_receive_time_added() -> None:
    body = json.dumps(
        {
            "type": "worker-heartbeat",
            "hostname": "h",
            "timestamp": 17.25,
            "utcoffset": -5,
            "freq": 2.0,
        }
    ).encode()
    (decoded,) = decode(body).events
    assert decoded.event.timestamp == 17.25  # never localised by utcoffset
    normalized = json.loads(decoded.open_json + b"}")
    assert normalized["timestamp"] == 17.25 and normalized["local_received"] == 123.5


def test_custom_task_event_keeps_its_fields_in_the_stream() -> None:
    body = json.dumps(
        {
            "type": "task-progress",
            "uuid": "u",
            "hostname": "h",
            "timestamp": 1.0,
            "current": 2,
            "total": 5,
        }
    ).encode()
    (decoded,) = decode(body).events
    assert isinstance(decoded.event, ev.TaskCustom) and decoded.event.type == "task-progress"
    assert json.loads(decoded.open_json + b"}")["current"] == 2


def test_unset_is_not_null() -> None:
    (d,) = decode(
        json.dumps(
            {"type": "task-received", "uuid": "u", "hostname": "h", "timestamp": 1.0, "eta": None}
        ).encode()
    ).events
    assert isinstance(d.event, ev.TaskReceived)
    assert d.event.eta is None and d.event.name is msgspec.UNSET


def test_oversize_fields_are_truncated_not_dropped() -> None:
    body = json.dumps(
        {
            "type": "task-failed",
            "uuid": "u",
            "hostname": "h",
            "timestamp": 1.0,
            "traceback": "é" * 5000,
            "exception": "E()",
        }
    ).encode()
    result = decode(body, limit=1000)
    assert result.truncated == 1 and not result.bad
    (d,) = result.events
    assert isinstance(d.event, ev.TaskFailed) and isinstance(d.event.traceback, str)
    assert len(d.event.traceback.encode()) < 1100 and d.event.traceback.endswith("bytes]")


def test_bad_events_have_reasons_and_good_neighbours_survive() -> None:
    good = {"type": "task-started", "uuid": "u", "hostname": "h", "timestamp": 1.0}
    result = decode(json.dumps([good, {"type": "task-started"}, "text", good]).encode())
    assert len(result.events) == 2
    assert sorted(b.reason for b in result.bad) == ["missing_field", "missing_type"]


def test_msgpack_bodies_via_kombu() -> None:
    body = msgspec.msgpack.encode(
        {"type": "task-started", "uuid": "u", "hostname": "h", "timestamp": 1.0}
    )
    assert len(decode(body, ctype="application/x-msgpack").events) == 1
    assert decode(b"\x80", ctype="application/x-python-serialize").bad[0].reason == (
        "unsupported_content_type"
    )


def test_sender_keys_that_readers_rely_on_are_dropped() -> None:
    """A worker event carrying a stray ``uuid``, or any event carrying the keys the collector
    adds itself, still gives a normalized event every reader can decode as StreamEvent."""
    stray = {
        "type": "worker-heartbeat",
        "hostname": "h",
        "timestamp": 1.0,
        "uuid": 5,
        "stream_id": 7,
        "task_name": [],
        "local_received": "x",
        "freq": 2.0,
    }
    (d,) = decode(json.dumps(stray).encode()).events
    normalized = msgspec.json.decode(d.open_json + b"}", type=StreamEvent)
    assert normalized.uuid is None and normalized.local_received == 123.5
    task = {"type": "task-started", "uuid": "u", "hostname": "h", "timestamp": 1.0, "task_state": 3}
    (t,) = decode(json.dumps(task).encode()).events
    assert b"task_state" not in t.open_json
