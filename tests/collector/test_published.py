"""The events channel: one pub/sub message per script call, its events one per line, each the
stream entry with its ``stream_id``, in stream order."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from services.collector.writer import Writer
from shared.events import published_events
from shared.settings import Settings
from tests.collector.test_retention import T0, lifecycle
from tests.support import readback


def test_one_message_per_call_with_every_event_in_stream_order(
    r: redis.Redis, settings: Settings
) -> None:
    writer = Writer(r, settings)
    pubsub = r.pubsub()
    pubsub.subscribe(writer.keys.events_channel)
    try:
        deadline = time.monotonic() + 10
        # the server's confirmation: only then is a message published on another connection
        # sure to reach this one
        confirmed = None
        while confirmed is None or confirmed["type"] != "subscribe":
            assert time.monotonic() < deadline, "no subscription"
            confirmed = pubsub.get_message(timeout=0.1)
        events = lifecycle("pub-a", T0) + lifecycle("pub-b", T0 + 5)
        readback.apply(writer, events)
        messages: list[bytes] = []
        while time.monotonic() < deadline:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is None:
                if messages:
                    break
                continue
            messages.append(message["data"])
    finally:
        pubsub.close()
    shards = {writer.keys.shard_for(u).index for u in ("pub-a", "pub-b")}
    assert len(messages) == len(shards)
    published = [json.loads(line) for m in messages for line in published_events(m)]
    assert len(published) == len(events)
    entries: list[tuple[str, Any]] = []
    for shard in writer.keys.all_shards:
        stream: Any = r.xrange(shard.stream)
        entries += [(sid.decode(), json.loads(fields[b"e"])) for sid, fields in stream]
    by_id = dict(entries)
    for event in published:
        sid = event.pop("stream_id")
        assert by_id[sid] == event
    # within a shard, lines come in stream order
    for m in messages:
        ids = [json.loads(line)["stream_id"] for line in published_events(m)]
        assert ids == sorted(ids, key=lambda s: tuple(int(p) for p in s.split("-")))


def test_a_one_event_message_from_an_older_collector_is_read_as_it_is() -> None:
    old = b'{"type":"task-sent","uuid":"u","timestamp":1.0,"stream_id":"1-0"}'
    assert published_events(old) == [old]
    assert published_events(b'7-1 {"type":"task-sent"}\n7-2 {"type":"x"}') == [
        b'{"type":"task-sent","stream_id":"7-1"}',
        b'{"type":"x","stream_id":"7-2"}',
    ]
