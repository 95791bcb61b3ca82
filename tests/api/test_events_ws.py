"""The WebSocket relay against real API processes: filters, Flower 1.0 paths, resume with no
gap and no duplicate while events keep arriving, lost-events notice, a slow client cut off
while a fast one keeps up, and two API processes relaying the same events."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from shared.keys import Keys
from tests.support.api import Api, clear_namespace, seed
from tests.support.dataset import task_events
from tests.support.replies import entries
from tests.support.servers import RedisServer

EVENTS = task_events(40, seed=11)
TASK_EVENTS = [e for e in EVENTS if e["type"].startswith("task-")]


def _settings(shards: int) -> dict[str, str]:
    return {"shards": str(shards)}


async def collect(
    ws: aiohttp.ClientWebSocketResponse, count: int, timeout: float = 30
) -> list[Any]:
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            out.append(json.loads(msg.data))
    return out


async def quiet(ws: aiohttp.ClientWebSocketResponse, seconds: float = 0.5) -> list[Any]:
    """Whatever else arrives within ``seconds`` (to check nothing unexpected follows)."""
    extra: list[Any] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                extra.append(json.loads(msg.data))
    except TimeoutError:
        pass
    return extra


async def seed_async(server: RedisServer, namespace: str, events: list[Any], **kw: Any) -> None:
    await asyncio.to_thread(seed, server, namespace, events, **kw)


def identity(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["stream_id"], e["type"], e["hostname"], e["timestamp"], e.get("clock"))


def stream_entries(server: RedisServer, namespace: str, shards: int) -> list[list[Any]]:
    client = redis.Redis(port=server.port)
    try:
        return [
            [
                {**json.loads(f[b"e"]), "stream_id": sid.decode()}
                for sid, f in entries(client.xrange(s.stream))
            ]
            for s in Keys(namespace, shards).all_shards
        ]
    finally:
        client.close()


def stream_ids(server: RedisServer, namespace: str, shards: int) -> list[list[str]]:
    client = redis.Redis(port=server.port)
    try:
        return [
            [sid.decode() for sid, _ in entries(client.xrange(s.stream))]
            for s in Keys(namespace, shards).all_shards
        ]
    finally:
        client.close()


@pytest.mark.parametrize("shards", [1, 3])
async def test_filters(redis_server: RedisServer, start_api: Any, shards: int) -> None:
    ns = f"wsf{shards}"
    clear_namespace(redis_server, ns)
    api: Api = start_api(redis_server, ns, **_settings(shards))
    uuid = TASK_EVENTS[5]["uuid"]
    cases: dict[str, Any] = {
        "": lambda e: True,
        "type=task-succeeded": lambda e: e["type"] == "task-succeeded",
        "type=task-*&taskname=tasks.add": lambda e: (
            e["type"].startswith("task-") and e.get("task_name") == "tasks.add"
        ),
        "type=worker-*": lambda e: e["type"].startswith("worker-"),
        "worker=celery@beta&state=SUCCESS": lambda e: (
            e["hostname"] == "celery@beta" and e.get("task_state") == "SUCCESS"
        ),
        f"uuid={uuid}": lambda e: e.get("uuid") == uuid,
        "type=task-failed&type=task-retried": lambda e: (
            e["type"] in ("task-failed", "task-retried")
        ),
    }
    flower_paths = {
        "/api/task/events/task-started/": lambda e: e["type"] == "task-started",
        f"/api/task/events/received/{uuid}": lambda e: (
            e["type"] == "task-received" and e.get("uuid") == uuid
        ),
    }
    async with aiohttp.ClientSession() as session:
        sockets = {q: await session.ws_connect(f"{api.url}/api/events?{q}") for q in cases}
        sockets |= {p: await session.ws_connect(f"{api.url}{p}") for p in flower_paths}
        await seed_async(redis_server, ns, EVENTS, shards=shards, batch=7)
        everything = await collect(sockets[""], len(EVENTS))
        relayed = [(e["type"], e.get("uuid"), e["timestamp"]) for e in everything]
        sent = [(e["type"], e.get("uuid"), e["timestamp"]) for e in EVENTS]
        # one stream keeps the emission order; shards are published shard by shard per batch
        assert relayed == sent if shards == 1 else sorted(relayed) == sorted(sent)
        assert all("stream_id" in e for e in everything)
        assert all(("cursor" in e) == (shards > 1) for e in everything)
        assert await quiet(sockets[""], 0.3) == []
        for key, predicate in {**cases, **flower_paths}.items():
            if key == "":
                continue
            expected = [e for e in everything if predicate(e)]
            got = await quiet(sockets[key], 1.0)
            assert [(e["type"], e.get("uuid")) for e in got] == [
                (e["type"], e.get("uuid")) for e in expected
            ], key
            # every client gets the same message (the cursor is the relay's position after it)
            assert got == expected, key
            assert expected or key.startswith("/api/task/events/received"), key
    clear_namespace(redis_server, ns)


@pytest.mark.parametrize("shards", [1, 3])
async def test_resume_has_no_gap_and_no_duplicate(
    redis_server: RedisServer, start_api: Any, shards: int
) -> None:
    ns = f"wsr{shards}"
    clear_namespace(redis_server, ns)
    api: Api = start_api(redis_server, ns, **_settings(shards))
    first, rest = EVENTS[:60], EVENTS[60:]
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{api.url}/api/events")
        await seed_async(redis_server, ns, first, shards=shards, batch=5)
        got = await collect(ws, len(first))
        await ws.close()
        cut = got[24]
        cursor = cut["cursor"] if shards > 1 else cut["stream_id"]
        # events keep arriving while the resuming client replays and switches to live
        writer = threading.Thread(target=seed, args=(redis_server, ns, rest, shards, 3))
        writer.start()
        ws = await session.ws_connect(f"{api.url}/api/events?since={cursor}")
        await asyncio.to_thread(writer.join)
        resumed = await collect(ws, len(EVENTS) - 25)
        assert await quiet(ws) == []
        await ws.close()
    # stream ids are per shard: an event is its (shard stream id, type, sender, time, clock)
    ids = [identity(e) for e in resumed]
    assert len(set(ids)) == len(ids), "duplicates"
    # exactly the stream's entries after the cursor, per shard, in order
    positions = cursor.split(",") if shards > 1 else [cursor]

    def key(sid: str) -> tuple[int, ...]:
        return tuple(int(x) for x in sid.split("-"))

    per_shard = stream_entries(redis_server, ns, shards)
    expected = {
        identity(entry)
        for shard, entries in enumerate(per_shard)
        for entry in entries
        if key(entry["stream_id"]) > key(positions[shard])
    }
    assert set(ids) == expected
    if shards == 1:  # one stream: the order is the emission order
        assert [(e["type"], e.get("uuid")) for e in resumed] == [
            (e["type"], e.get("uuid")) for e in EVENTS[25:]
        ]
    clear_namespace(redis_server, ns)


async def test_lost_events_are_announced(redis_server: RedisServer, start_api: Any) -> None:
    ns = "wsl"
    clear_namespace(redis_server, ns)
    many = task_events(400, seed=5)
    seed(redis_server, ns, many, stream_maxlen="10", batch=50)
    api: Api = start_api(redis_server, ns)
    retained = stream_ids(redis_server, ns, 1)[0]
    assert len(retained) < len(many)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{api.url}/api/events?since=1-0")
        notice, *replayed = await collect(ws, 1 + len(retained))
        assert notice["type"] == "pollen-events-lost" and notice["first_id"] == retained[0]
        assert [e["stream_id"] for e in replayed] == retained
        await ws.close()
        # a cursor inside the retained window: no notice
        ws = await session.ws_connect(f"{api.url}/api/events?since={retained[3]}")
        replayed = await collect(ws, len(retained) - 4)
        assert [e["stream_id"] for e in replayed] == retained[4:]
        await ws.close()
    clear_namespace(redis_server, ns)


def _small_buffer_socket(addr_info: Any) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return sock


async def test_slow_client_is_cut_off_fast_one_keeps_up(
    redis_server: RedisServer, start_api: Any
) -> None:
    ns = "wss"
    clear_namespace(redis_server, ns)
    api: Api = start_api(redis_server, ns, ws_queue="30")
    big = [
        {**e, "args": f"('{'x' * 30000}', {i})"} if e["type"] == "task-received" else e
        for i, e in enumerate(task_events(500, seed=9))
    ]
    big = [e for e in big if e["type"].startswith("task-")]
    slow_connector = aiohttp.TCPConnector(socket_factory=_small_buffer_socket)
    async with (
        aiohttp.ClientSession() as fast_session,
        aiohttp.ClientSession(connector=slow_connector) as slow_session,
    ):
        slow = await slow_session.ws_connect(f"{api.url}/api/events", max_msg_size=0)
        fast = await fast_session.ws_connect(f"{api.url}/api/events", max_msg_size=0)
        writer = asyncio.create_task(seed_async(redis_server, ns, big, batch=25))
        got = await collect(fast, len(big), timeout=120)
        await writer
        assert [e["stream_id"] for e in got] == stream_ids(redis_server, ns, 1)[0]
        # the slow client gets what was already on its way, then the close
        received = 0
        async with asyncio.timeout(60):
            while True:
                msg = await slow.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                received += 1
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert slow.close_code == 1013, (msg, slow.close_code)
        assert "too slow" in (msg.extra or "")  # the reason
        assert received < len(big)
    clear_namespace(redis_server, ns)


async def test_two_api_processes_answer_the_same(
    redis_server: RedisServer, start_api: Any, tmp_path: Path
) -> None:
    ns = "two"
    clear_namespace(redis_server, ns)
    a: Api = start_api(redis_server, ns, shards="3")
    b: Api = start_api(redis_server, ns, shards="3")
    async with aiohttp.ClientSession() as session:
        wa = await session.ws_connect(f"{a.url}/api/events?type=task-*")
        wb = await session.ws_connect(f"{b.url}/api/events?type=task-*")
        await seed_async(redis_server, ns, EVENTS, shards=3, batch=9)
        got_a = await collect(wa, len(TASK_EVENTS))
        got_b = await collect(wb, len(TASK_EVENTS))
        assert got_a == got_b
    for path in (
        "/api/tasks?limit=1000",
        "/api/tasks?limit=7&offset=3&sort_by=-received",
        "/api/tasks?search=tasks&state=SUCCESS",
        "/api/task/types",
        "/api/workers?status=1",
        "/api/workers",
        f"/api/task/info/{TASK_EVENTS[0]['uuid']}",
    ):
        assert a.get(path)[2] == b.get(path)[2], path

    def stable(text: bytes) -> list[str]:
        return [line for line in text.decode().splitlines() if "heartbeat_age" not in line]

    assert stable(a.get("/metrics")[2]) == stable(b.get("/metrics")[2])
    clear_namespace(redis_server, ns)


async def collect_batches(
    ws: aiohttp.ClientWebSocketResponse, count: int, timeout: float = 30
) -> list[Any]:
    """Events of ``batch=`` messages (each a JSON array) until ``count`` have arrived."""
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            batch = json.loads(msg.data)
            assert isinstance(batch, list) and batch, batch
            out.extend(batch)
    return out


@pytest.mark.parametrize("shards", [1, 3])
async def test_batches_hold_the_same_messages(
    redis_server: RedisServer, start_api: Any, shards: int
) -> None:
    """``batch=<ms>``: JSON arrays of the very messages a client without it gets (cursors
    included), live and when resuming from any message's cursor."""
    ns = f"wsb{shards}"
    clear_namespace(redis_server, ns)
    api: Api = start_api(redis_server, ns, **_settings(shards))
    async with aiohttp.ClientSession() as session:
        single = await session.ws_connect(f"{api.url}/api/events?type=task-*")
        batched = await session.ws_connect(f"{api.url}/api/events?type=task-*&batch=50")
        await seed_async(redis_server, ns, EVENTS, shards=shards, batch=7)
        expected = await collect(single, len(TASK_EVENTS))
        assert await collect_batches(batched, len(TASK_EVENTS)) == expected
        assert await quiet(batched, 0.3) == []
        # resume from the 11th message: what followed it, as arrays
        cursor = expected[10]["cursor"] if shards > 1 else expected[10]["stream_id"]
        resumed = await session.ws_connect(
            f"{api.url}/api/events?type=task-*&batch=20&since={cursor}"
        )
        got = await collect_batches(resumed, len(expected) - 11)
        assert await quiet(resumed, 0.3) == []
        if shards == 1:
            assert got == expected[11:]
        else:  # a replay merges the shards by stream id; the set is the same
            assert sorted(map(identity, got)) == sorted(map(identity, expected[11:]))
    for bad in ("0", "abc", "10001", "-5"):
        status, _, body = api.get(f"/api/events?batch={bad}")
        assert status == 400 and json.loads(body)["error"].startswith("batch: "), (bad, body)
    clear_namespace(redis_server, ns)
