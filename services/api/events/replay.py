"""``since=``: the retained events after a cursor, merged over the shards in id order."""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from services.api.context import Context
from services.api.events.client import Client
from services.api.events.frames import entry_message
from services.api.events.ids import StreamId, format_id, parse_id
from shared.events import StreamEvent

_decode_event = msgspec.json.Decoder(StreamEvent).decode
_encode = msgspec.json.encode
#: Entries read per XRANGE call during a replay.
REPLAY_BATCH = 500


async def _stream_info(c: Context, key: str) -> dict[str, Any]:
    try:
        flat = await c.redis.execute_command("XINFO", "STREAM", key)
    except Exception as exc:  # no such key: nothing retained
        if "no such key" in str(exc).lower():
            return {}
        raise
    if isinstance(flat, dict):
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in flat.items()}
    return {
        (flat[i].decode() if isinstance(flat[i], bytes) else flat[i]): flat[i + 1]
        for i in range(0, len(flat), 2)
    }


async def replay(c: Context, client: Client, since: list[StreamId]) -> None:
    """Send the retained events after ``since`` (per shard), merged in id order."""
    shards = c.keys.all_shards
    client.sent = list(since)
    for shard in shards:
        info = await _stream_info(c, shard.stream)
        deleted = info.get("max-deleted-entry-id")
        first = info.get("first-entry")
        first_id = first[0].decode() if first else None
        start = since[shard.index]
        # trimming removes the oldest entries: with some removed (entries-added > length), a
        # cursor older than the first entry may have missed some
        added, length = info.get("entries-added"), info.get("length")
        trimmed = added is not None and length is not None and int(added) > int(length)
        lost = first_id is not None and trimmed and start < parse_id(first_id)
        if deleted is not None:
            text = deleted.decode() if isinstance(deleted, bytes) else str(deleted)
            lost = lost or start < parse_id(text)
        if lost:
            notice = {
                "type": "pollen-events-lost",
                "shard": shard.index,
                "since": format_id(start),
                "first_id": first_id,
            }
            await client.send([_encode(notice)])
        client.replayed[shard.index] = start
    # k-way merge of the shards' streams by id
    batches: list[deque[tuple[StreamId, bytes, dict[bytes, bytes]]]] = [deque() for _ in shards]
    exhausted = [False] * len(shards)

    async def refill(i: int) -> None:
        position = client.replayed[i]
        assert position is not None
        entries = await c.redis.xrange(
            shards[i].stream, min="(" + format_id(position), count=REPLAY_BATCH
        )
        batches[i] = deque((parse_id(sid.decode()), sid, fields) for sid, fields in entries)
        exhausted[i] = not entries

    out: list[bytes] = []
    while True:
        for i in range(len(shards)):
            if not batches[i] and not exhausted[i]:
                await client.send(out)
                out = []
                await refill(i)
        live = [i for i in range(len(shards)) if batches[i]]
        if not live:
            await client.send(out)
            return
        i = min(live, key=lambda k: batches[k][0][0])
        sid, raw_id, fields = batches[i].popleft()
        client.replayed[i] = sid
        message = entry_message(raw_id, fields)
        if message is None:
            continue
        try:
            ev = _decode_event(fields[b"e"])
        except msgspec.DecodeError:
            continue
        if client.filter.match(ev):
            out.append(client.replayed_message(i, sid, message))
