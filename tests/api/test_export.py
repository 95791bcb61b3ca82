"""``/api/tasks/export``: every task of a query, as ``/api/tasks`` lists it, streamed.

The oracle is the listing itself: an API over one shard with a scan limit no query reaches
answers ``/api/tasks?limit=1000`` (all 300 tasks fit); the export comes from an API over three
shards whose pages are 7 tasks and whose scans stop every 50 entries, so it must walk on past
full pages and budget-capped ones, across shards and groups, to give the same tasks in the same
order."""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.api.test_cluster import queries
from tests.support.api import Api, api_env, clear_namespace, seed
from tests.support.dataset import task_events
from tests.support.servers import RedisServer, wait_for

EVENTS = task_events(300, seed=41)
ONE, THREE, BIG = "apiexp1", "apiexp3", "apiexpbig"
BIG_TASKS = 3000


@pytest.fixture(scope="module")
def apis(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Api, Api]]:
    """The oracle (one shard, no cap reached) and the exporter (three shards, tight budgets)."""
    workdir = tmp_path_factory.mktemp("export")
    started: list[Api] = []
    try:
        for ns in (ONE, THREE):
            clear_namespace(redis_server, ns)
        seed(redis_server, ONE, EVENTS)
        seed(redis_server, THREE, EVENTS, shards=3)
        started.append(Api(api_env(redis_server, ONE), workdir / "oracle.log"))
        tight = api_env(redis_server, THREE, shards="3", max_page="7", search_scan_limit="50")
        started.append(Api(tight, workdir / "export.log"))
        yield started[0], started[1]
    finally:
        for api in started:
            api.stop()
        for ns in (ONE, THREE):
            clear_namespace(redis_server, ns)


def listing(api: Api, query: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    limit = query.get("limit", 1000)
    params = {**{k: v for k, v in query.items() if v is not None}, "limit": limit}
    return [(u, dict(t)) for u, t in api.json("/api/tasks?" + urlencode(params))]


def export(api: Api, query: dict[str, Any], fmt: str = "ndjson") -> tuple[dict[str, str], bytes]:
    params = {**{k: v for k, v in query.items() if v is not None}, "format": fmt}
    status, headers, body = api.get("/api/tasks/export?" + urlencode(params))
    assert status == 200, (params, body[:300])
    return headers, body


def as_listed(task: dict[str, Any]) -> dict[str, Any]:
    """An ``/api/task/info`` object as ``/api/tasks`` lists it: ``worker`` left out when null."""
    return {k: v for k, v in task.items() if not (k == "worker" and v is None)}


def test_ndjson_is_the_whole_listing_in_order(apis: tuple[Api, Api]) -> None:
    oracle, exporter = apis
    every = queries()
    selecting = 0
    for query in every:
        expected = listing(oracle, query)
        headers, body = export(exporter, query)
        assert headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
        lines = body.split(b"\n")
        assert lines[-1] == b"", query  # every line ends
        got = [json.loads(line) for line in lines[:-1]]
        assert [(t["uuid"], as_listed(t)) for t in got] == expected, query
        selecting += bool(expected)
    assert selecting >= len(every) * 3 // 4


def test_each_line_is_the_task_info(apis: tuple[Api, Api]) -> None:
    oracle, exporter = apis
    _, body = export(exporter, {})
    lines = body.splitlines()
    assert len(lines) == len({e["uuid"] for e in EVENTS if "uuid" in e})
    for line in lines:
        uuid = json.loads(line)["uuid"]
        status, _, info = oracle.get(f"/api/task/info/{uuid}")
        assert (status, line) == (200, info)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_csv_has_the_same_tasks_as_columns(apis: tuple[Api, Api]) -> None:
    _, exporter = apis
    for query in ({}, {"search": "args:hello"}, {"sort_by": "name", "state": "FAILURE"}):
        _, ndjson = export(exporter, query)
        headers, body = export(exporter, query, "csv")
        assert headers["Content-Type"] == "text/csv; charset=utf-8"
        assert headers["Content-Disposition"] == 'attachment; filename="tasks.csv"'
        rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
        tasks = [json.loads(line) for line in ndjson.splitlines()]
        header = rows[0]
        assert header[:3] == ["uuid", "name", "state"] and header[-2:] == ["lost", "lost_at"]
        assert len(rows) == len(tasks) + 1 and tasks, query
        for row, task in zip(rows[1:], tasks, strict=True):
            assert row == [cell(task.get(column)) for column in header], query


def test_a_csv_of_nothing_is_its_header(apis: tuple[Api, Api]) -> None:
    _, exporter = apis
    _, body = export(exporter, {"search": "nothing-matches-this"}, "csv")
    assert body.decode().count("\r\n") == 1 and body.startswith(b"uuid,name,state,")
    _, body = export(exporter, {"search": "nothing-matches-this"})
    assert body == b""


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("format=xml", "format"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("sort_by=colour", "sort_by"),
        ("search=state:", "search"),
        ("cursor=not-a-cursor", "cursor"),
        ("received_start=yesterday", "received_start"),
    ],
)
def test_bad_parameter_is_400_naming_it(apis: tuple[Api, Api], query: str, param: str) -> None:
    _, exporter = apis
    status, headers, body = exporter.get(f"/api/tasks/export?{query}")
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"].startswith(f"{param}: "), body


def test_starts_after_a_page_cursor(apis: tuple[Api, Api]) -> None:
    oracle, exporter = apis
    status, headers, _ = exporter.get("/api/tasks?limit=5&sort_by=-received")
    assert status == 200
    cursor = headers["X-Pollen-Next-Cursor"]
    _, body = export(exporter, {"sort_by": "-received", "cursor": cursor})
    expected = [u for u, _ in listing(oracle, {"sort_by": "-received"})][5:]
    assert [json.loads(line)["uuid"] for line in body.splitlines()] == expected


@pytest.fixture
def big(redis_server: RedisServer, tmp_path: Path) -> Iterator[Api]:
    clear_namespace(redis_server, BIG)
    events = [e for e in task_events(BIG_TASKS, seed=42) if e["type"] == "task-received"]
    seed(redis_server, BIG, events)
    api = Api(api_env(redis_server, BIG, max_page="50"), tmp_path / "api.log")
    try:
        yield api
    finally:
        api.stop()
        clear_namespace(redis_server, BIG)


def test_stops_when_the_client_leaves(big: Api) -> None:
    """A client that reads a little and goes: the export stops (it says so, with how many tasks
    it sent) instead of walking the rest of the query into a dead socket."""
    sock = socket.socket()
    # a small window: the server's writes wait for the client long before the end
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", big.port))
    sock.sendall(b"GET /api/tasks/export HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200"), first
    sock.close()
    message = "export stopped after"
    wait_for(lambda: message in big.process.output(), timeout=30, message="the export stopping")
    line = next(x for x in big.process.output().splitlines() if message in x)
    sent = int(line.split(message)[1].split()[0])
    # the same export read whole has them all, and says so
    _, _, body = big.get("/api/tasks/export")
    whole = len(body.splitlines())
    assert 0 <= sent < whole, line
    wait_for(
        lambda: f"export done: {whole} tasks" in big.process.output(),
        timeout=30,
        message="the whole export logged",
    )
