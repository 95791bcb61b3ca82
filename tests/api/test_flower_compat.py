"""Flower is the oracle for the API: the same events go to Flower's own state machinery
(``flower.events.EventsState``, its search engine and ``flower.utils.tasks.iter_tasks``, shaped
as its handlers shape them) and, through the collector's write path, to Redis; a real API
process must answer as Flower does, query by query and task by task, with 1 and 3 shards.
"""

from __future__ import annotations

import datetime
import json
import types
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from flower.events import EventsState
from flower.utils.tasks import iter_tasks

from tests.support.api import Api, api_env, clear_namespace, seed
from tests.support.dataset import task_events
from tests.support.servers import RedisServer

TASKS = 300
EVENTS = task_events(TASKS)


def _flower_state() -> Any:
    state = EventsState()
    for event in EVENTS:
        state.event(dict(event))
    return types.SimpleNamespace(state=state)


FLOWER = _flower_state()


def flower_tasks(**kw: Any) -> list[tuple[str, dict[str, Any]]]:
    """``flower.api.tasks.ListTasks.get``'s answer, as a list of pairs."""
    out = []
    for uuid, task in iter_tasks(FLOWER, **kw):
        d = task.as_dict()
        worker = d.pop("worker", None)
        if worker is not None:
            d["worker"] = worker.hostname
        d["children"] = sorted(d["children"])
        out.append((uuid, d))
    return out


def flower_info(uuid: str) -> dict[str, Any]:
    task = FLOWER.state.tasks.data[uuid]
    d: dict[str, Any] = task.as_dict()
    if task.worker is not None:
        d["worker"] = task.worker.hostname
    d["children"] = sorted(d["children"])
    return d


def pollen_tasks(api: Api, **params: Any) -> list[tuple[str, dict[str, Any]]]:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    pairs = api.json(f"/api/tasks?{query}")
    out = []
    for uuid, fields in pairs:
        d = dict(fields)
        assert list(d) == [k for k, _ in fields], "duplicate fields"
        d["children"] = sorted(d["children"])
        out.append((uuid, (list(d), d)))
    # the field order is part of the answer
    return [(uuid, d) for uuid, (_, d) in out]


def _ordered_keys(api: Api, path: str) -> list[list[str]]:
    return [[k for k, _ in fields] for _, fields in api.json(path)]


@pytest.fixture(scope="module", params=[1, 3], ids=["1-shard", "3-shards"])
def api(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Api]:
    shards = request.param
    namespace = f"compat{shards}"
    clear_namespace(redis_server, namespace)
    seed(redis_server, namespace, EVENTS, shards)
    log = tmp_path_factory.mktemp("compat") / "api.log"
    running = Api(api_env(redis_server, namespace, shards=str(shards)), log)
    yield running
    running.stop()
    clear_namespace(redis_server, namespace)


def _minute(offset_minutes: float) -> str:
    first = min(e["timestamp"] for e in EVENTS)
    moment = datetime.datetime.fromtimestamp(first + offset_minutes * 60)
    return moment.strftime("%Y-%m-%d %H:%M")


FILTERS: list[dict[str, Any]] = [
    {},
    {"state": "SUCCESS"},
    {"state": "failure"},
    {"state": "PROGRESS"},
    {"state": "PENDING"},
    {"taskname": "tasks.add"},
    {"taskname": "PROJ.REPORTS.BUILD"},
    {"taskname": "ünicode.task"},
    {"workername": "celery@beta"},
    {"workername": "celery@gamma"},
    {"state": "SUCCESS", "taskname": "tasks.mul"},
    {"state": "STARTED", "workername": "celery@alpha"},
    {"taskname": "tasks.add", "workername": "celery@alpha"},
    {"state": "SUCCESS", "taskname": "tasks.add", "workername": "celery@beta"},
    {"taskname": "no.such.task"},
    {"state": "All", "taskname": "All", "workername": "All"},
    {"received_start": _minute(30)},
    {"received_end": _minute(60)},
    {"received_start": _minute(20), "received_end": _minute(90)},
    {"received_start": _minute(20), "received_end": _minute(90), "state": "SUCCESS"},
]
SEARCHES = [
    "tasks.add",
    "name:reports",
    "state:success",
    "state:SUCCESS name:mul",
    "worker:alpha",
    "args:hello",
    '"hello world"',
    "kwargs:user=bob",
    "kwargs:USER=alice",
    "kwargs:user",
    "result:'ok' OR result:rows",
    "(name:add OR name:mul) state:failure",
    "grüße",
    "ÜNICODE",
    "it's",
    "x\\\\y",
    "report.csv",
    "alice AND kwargs:n=3",
    "nothing-matches-this",
    "boom",
    # name/state/worker terms are resolved over the known values; the rest is decided in Lua
    "gamma",
    "worker:GAMMA OR args:hello",
    "state:progress",
    "name:ünicode",
    "name:no.such.task",
    "worker:nosuch AND args:hello",
    "(name:nosuch OR result:rows) state:success",
    "success",
    next(e["uuid"] for e in EVENTS if "uuid" in e)[:8].upper(),
    "'ok'",
    '"(1, 2)"',
    "rows'",
    "\"user': 'b\"",
]


def _flower_kw(f: dict[str, Any]) -> dict[str, Any]:
    def value(key: str) -> Any:
        v = f.get(key)
        return None if v in (None, "All") else v

    return {
        "type": value("taskname"),
        "worker": value("workername"),
        "state": value("state"),
        "received_start": f.get("received_start"),
        "received_end": f.get("received_end"),
    }


@pytest.mark.parametrize("sort_by", [None, "received", "-received", "started", "-started"])
@pytest.mark.parametrize("f", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_list_equals_flower(api: Api, f: dict[str, Any], sort_by: str | None) -> None:
    expected = flower_tasks(limit=1000, sort_by=sort_by, **_flower_kw(f))
    assert pollen_tasks(api, limit=1000, sort_by=sort_by, **f) == expected


@pytest.mark.parametrize("search", SEARCHES)
def test_search_equals_flower(api: Api, search: str) -> None:
    expected = flower_tasks(limit=1000, search=search)
    got = pollen_tasks(api, limit=1000, search=search)
    assert [u for u, _ in got] == [u for u, _ in expected]
    assert got == expected


@pytest.mark.parametrize("search", ["tasks", "state:success", "kwargs:user=bob"])
@pytest.mark.parametrize("sort_by", [None, "-received"])
def test_search_with_filters_equals_flower(api: Api, search: str, sort_by: str | None) -> None:
    kw = {"workername": "celery@alpha", "received_start": _minute(10)}
    expected = flower_tasks(limit=1000, search=search, sort_by=sort_by, **_flower_kw(kw))
    assert pollen_tasks(api, limit=1000, search=search, sort_by=sort_by, **kw) == expected


@pytest.mark.parametrize(
    ("offset", "limit"), [(0, 1), (0, 10), (7, 10), (95, 50), (290, 50), (1000, 5), (3, 0)]
)
@pytest.mark.parametrize("sort_by", [None, "received", "-started"])
@pytest.mark.parametrize("f", [{}, {"state": "SUCCESS"}, {"taskname": "tasks.add"}], ids=str)
def test_pages_equal_flower(
    api: Api, f: dict[str, Any], sort_by: str | None, offset: int, limit: int
) -> None:
    expected = flower_tasks(limit=limit, offset=offset, sort_by=sort_by, **_flower_kw(f))
    got = pollen_tasks(api, limit=limit, offset=offset, sort_by=sort_by, **f)
    assert [u for u, _ in got] == [u for u, _ in expected]


@pytest.mark.parametrize("sort_by", ["name", "-name", "state", "-state"])
@pytest.mark.parametrize("f", [{}, {"state": "SUCCESS"}, {"workername": "celery@beta"}], ids=str)
def test_group_sorts_match_flower_groups(api: Api, sort_by: str, f: dict[str, Any]) -> None:
    """Same groups in the same order with the same tasks; inside a group Pollen puts the newest
    first where Flower orders by uuid (documented in docs/api.md)."""
    field = sort_by.lstrip("-")
    expected = flower_tasks(limit=1000, sort_by=sort_by, **_flower_kw(f))
    got = pollen_tasks(api, limit=1000, sort_by=sort_by, **f)

    def groups(pairs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, set[str]]]:
        out: list[tuple[str, set[str]]] = []
        for uuid, task in pairs:
            key = (task[field] or "").casefold()
            if not out or out[-1][0] != key:
                out.append((key, set()))
            out[-1][1].add(uuid)
        return out

    assert groups(got) == groups(expected)
    for uuid, task in got:
        assert task == dict(expected)[uuid]
    # inside each group (of one exact value): newest first
    exact: dict[str | None, list[float]] = {}
    for _, task in got:
        exact.setdefault(task[field], []).append(task["timestamp"])
    for stamps in exact.values():
        assert stamps == sorted(stamps, reverse=True)


def test_field_order_is_flowers(api: Api) -> None:
    expected = [list(d) for _, d in flower_tasks(limit=50)]
    assert _ordered_keys(api, "/api/tasks?limit=50") == expected


def test_task_info_equals_flower(api: Api) -> None:
    for uuid in list(FLOWER.state.tasks.keys()):
        pairs = api.json(f"/api/task/info/{uuid}")
        assert [k for k, _ in pairs] == list(flower_info(uuid)), uuid
        got = dict(pairs)
        got["children"] = sorted(got["children"])
        assert got == flower_info(uuid), uuid


def test_task_types_equal_flower(api: Api) -> None:
    assert dict(api.json("/api/task/types")) == {"task-types": FLOWER.state.task_types()}


def test_worker_status_equals_flower(api: Api) -> None:
    expected = {name: w.alive for name, w in FLOWER.state.workers.items()}
    got = dict(api.json("/api/workers?status=1"))
    assert got == expected
    assert any(expected.values()) and not all(expected.values())


def test_unknown_task_is_404_like_flower(api: Api) -> None:
    status, _, body = api.get("/api/task/info/00000000-dead-beef-0000-000000000000")
    assert status == 404
    assert json.loads(body) == {"error": "Unknown task '00000000-dead-beef-0000-000000000000'"}


def test_cursor_pages_cover_the_listing(api: Api) -> None:
    for query in ("", "&state=SUCCESS", "&sort_by=-received", "&sort_by=name", "&search=tasks"):
        full = [u for u, _ in api.json(f"/api/tasks?limit=1000{query}")]
        seen: list[str] = []
        cursor = ""
        for _ in range(100):
            status, headers, body = api.get(f"/api/tasks?limit=17{query}{cursor}")
            assert status == 200
            seen.extend(u for u, _ in json.loads(body, object_pairs_hook=list))
            nxt = headers.get("X-Pollen-Next-Cursor")
            if not nxt:
                break
            cursor = f"&cursor={nxt}"
        assert seen == full, query


FlowerQuery = Callable[..., list[tuple[str, dict[str, Any]]]]


@pytest.mark.parametrize(
    ("search", "state", "name"),
    [
        ("state:failure boom", "FAILURE", None),
        ("name:mul", None, "tasks.mul"),
        ("reports", None, None),
    ],
)
def test_search_terms_on_indexed_fields_walk_their_indexes(
    api: Api, search: str, state: str | None, name: str | None
) -> None:
    """A state/name term every match must satisfy picks the index walked: only that state's or
    those names' tasks are examined (a term on no field examines every task)."""
    status, headers, body = api.get(f"/api/tasks?limit=1000&search={search.replace(' ', '+')}")
    assert status == 200
    tasks = FLOWER.state.tasks.values()
    walked = [
        t for t in tasks if (state is None or t.state == state) and (name is None or t.name == name)
    ]
    assert int(headers["X-Pollen-Examined"]) == len(walked)
    assert [u for u, _ in json.loads(body, object_pairs_hook=list)] == [
        u for u, _ in flower_tasks(limit=1000, search=search)
    ]
