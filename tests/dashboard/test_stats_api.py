"""The endpoints the dashboard added to the API (``/api/stats/*``, ``/api/whoami``) and the
serving of its files, against a real API process over events written by the collector's own
write path. No browser needed."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.api.ui import FILES
from shared.histograms import quantile
from shared.keys import RUNTIME_BUCKETS
from tests.support.api import Api, api_env, clear_namespace, seed
from tests.support.servers import RedisServer

NAMESPACE = "stats"
TOKEN, RO_TOKEN = "dash-token", "dash-ro"


def events(now: float) -> list[dict[str, Any]]:
    """Two workers; tasks.a succeeds 3 times (runtimes 0.002, 0.02, 3.0) this minute and fails
    once; tasks.b succeeds once two minutes ago (0.3 s)."""
    out: list[dict[str, Any]] = []
    clock = 0

    def emit(kind: str, host: str, ts: float, **fields: Any) -> None:
        nonlocal clock
        clock += 1
        out.append(
            {"type": kind, "hostname": host, "timestamp": ts, "clock": clock, "pid": 1, **fields}
        )

    # w@one beats with a long freq: it must still be alive (last beat + 2 x freq) when a test
    # asks, however long the API takes to start on a loaded machine (with freq 2 it was alive
    # only until 3 s after seeding)
    emit("worker-online", "w@one", now - 5, freq=60.0, active=0, processed=0, loadavg=[0.5, 0, 0])
    emit("worker-heartbeat", "w@one", now - 1, freq=60.0, active=1, processed=4, loadavg=[1, 2, 3])
    emit("worker-online", "w@two", now - 900, freq=2.0, active=0, processed=0, loadavg=[0, 0, 0])
    emit("worker-offline", "w@two", now - 800, freq=2.0, active=0, processed=0, loadavg=[0, 0, 0])
    minute = (now // 60) * 60
    for i, runtime in enumerate((0.002, 0.02, 3.0)):
        u = f"a-{i}"
        emit("task-received", "w@one", minute + 1, uuid=u, name="tasks.a", args="()", kwargs="{}")
        emit("task-started", "w@one", minute + 2, uuid=u)
        emit("task-succeeded", "w@one", minute + 3, uuid=u, result="1", runtime=runtime)
    emit("task-received", "w@one", minute + 1, uuid="a-f", name="tasks.a", args="()", kwargs="{}")
    emit("task-failed", "w@one", minute + 4, uuid="a-f", exception="ValueError()", traceback="")
    emit("task-received", "w@one", minute - 120, uuid="b-0", name="tasks.b", args="()", kwargs="{}")
    emit("task-succeeded", "w@one", minute - 119, uuid="b-0", result="2", runtime=0.3)
    emit("task-received", "w@one", now - 1, uuid="run", name="tasks.a", args="()", kwargs="{}")
    emit("task-started", "w@one", now - 0.5, uuid="run")
    for e in out:
        e["local_received"] = e["timestamp"]
    return out


@pytest.fixture(scope="module")
def seeded(redis_server: RedisServer) -> Iterator[tuple[RedisServer, float]]:
    clear_namespace(redis_server, NAMESPACE)
    now = time.time()
    # keep the test off a minute boundary: the events of "this minute" must stay in it, those
    # at ``now - 1`` included (in the first second of a minute they fell in the one before)
    if not 2 <= now % 60 <= 50:
        time.sleep((62 - now % 60) % 60)  # to 2 s into a minute; sleep never returns early
        now = time.time()
    seed(redis_server, NAMESPACE, events(now))
    yield redis_server, now
    clear_namespace(redis_server, NAMESPACE)


@pytest.fixture(scope="module")
def api(
    seeded: tuple[RedisServer, float], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    server, _ = seeded
    env = api_env(server, NAMESPACE, chart_retention_days="1")
    started = Api(env, tmp_path_factory.mktemp("api") / "api.log")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def secured(
    seeded: tuple[RedisServer, float], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    server, _ = seeded
    env = api_env(server, NAMESPACE, api_tokens=f"{TOKEN},{RO_TOKEN}:ro")
    started = Api(env, tmp_path_factory.mktemp("api") / "api.log")
    yield started
    started.stop()


def test_workers_stats(api: Api) -> None:
    body = json.loads(api.get("/api/stats/workers")[2])
    workers = {w["hostname"]: w for w in body["workers"]}
    assert list(workers) == ["w@one", "w@two"]
    one, two = workers["w@one"], workers["w@two"]
    assert one["alive"] is True and two["alive"] is False
    assert one["loadavg"] == [1, 2, 3] and one["processed"] == 4 and one["active"] == 1
    assert one["executing"] == 1  # the task "run" is STARTED on it
    assert one["events"]["task-succeeded"] == 4 and one["events"]["task-failed"] == 1
    assert one["events"]["worker-heartbeat"] == 1
    assert two["events"] == {"worker-offline": 1, "worker-online": 1}
    assert one["inspected"] is False


def test_tasks_per_minute(api: Api, seeded: tuple[RedisServer, float]) -> None:
    _, now = seeded
    body = json.loads(api.get("/api/stats/tasks-per-minute?minutes=10")[2])
    assert body["minutes"] == 10 and body["step"] == 60
    assert body["start"] == (int(body["time"] // 60) - 9) * 60
    i = int(now // 60 - body["start"] // 60)  # the seeding minute (the last one, or near it)
    assert 5 <= i <= 9
    series = {(s["task"], s["state"]): s["counts"] for s in body["series"]}
    assert all(len(counts) == 10 for counts in series.values())
    expected = {
        ("tasks.a", "SUCCESS"): {i: 3},
        ("tasks.a", "FAILURE"): {i: 1},
        ("tasks.a", "STARTED"): {i: 4},
        ("tasks.b", "SUCCESS"): {i - 2: 1},
        ("tasks.b", "RECEIVED"): {i - 2: 1},
    }
    for key, counts in expected.items():
        assert series[key] == [counts.get(j, 0) for j in range(10)], key
    assert sum(series[("tasks.a", "RECEIVED")]) == 5


def test_tasks_per_minute_bad_minutes(api: Api) -> None:
    for bad in ("0", "x", str(1441)):  # retention is one day here
        status, _, body = api.get(f"/api/stats/tasks-per-minute?minutes={bad}")
        assert status == 400 and json.loads(body)["error"].startswith("minutes:"), bad


def test_runtime(api: Api) -> None:
    body = json.loads(api.get("/api/stats/runtime")[2])
    assert body["buckets"] == list(RUNTIME_BUCKETS)
    tasks = {t["task"]: t for t in body["tasks"]}
    a = tasks["tasks.a"]
    assert a["count"] == 3 and a["sum"] == pytest.approx(3.022)
    assert a["counts"][0] == 1 and a["counts"][2] == 1 and a["counts"][11] == 1  # 0.005/0.025/5
    assert 0.01 < a["p50"] <= 0.025 and 2.5 < a["p90"] <= 5.0
    assert tasks["tasks.b"]["count"] == 1 and 0.25 < tasks["tasks.b"]["p50"] <= 0.5
    only = json.loads(api.get("/api/stats/runtime?taskname=tasks.b")[2])
    assert [t["task"] for t in only["tasks"]] == ["tasks.b"]
    nobody = json.loads(api.get("/api/stats/runtime?workername=w@two")[2])
    assert nobody["tasks"] == []


def test_runtime_window_and_day_before(seeded: tuple[RedisServer, float], tmp_path: Path) -> None:
    """Percentiles over the tasks that succeeded in the last minutes, and over the same
    minutes a day earlier; the all-time histogram holds both."""
    server, now = seeded
    minute = (now // 60) * 60
    out: list[dict[str, Any]] = []
    runs = [("now", minute + 3, (0.002, 0.002, 0.3)), ("old", minute - 86400 + 3, (4.0, 4.0))]
    for tag, ts, runtimes in runs:
        for i, runtime in enumerate(runtimes):
            u = f"{tag}-{i}"
            out.append({"type": "task-received", "uuid": u, "name": "tasks.w", "timestamp": ts})
            out.append({"type": "task-succeeded", "uuid": u, "runtime": runtime, "timestamp": ts})
    out.append(  # ten minutes ago: outside a 2-minute window
        {"type": "task-received", "uuid": "mid", "name": "tasks.w", "timestamp": minute - 600}
    )
    out.append({"type": "task-succeeded", "uuid": "mid", "runtime": 9.0, "timestamp": minute - 600})
    for e in out:
        e.update(hostname="w@win", clock=1, pid=1, local_received=e["timestamp"])
    clear_namespace(server, "statswin")
    seed(server, "statswin", out)
    api = Api(api_env(server, "statswin", chart_retention_days="2"), tmp_path / "api.log")
    try:
        # 2 minutes: the seeding minute is in it, also if a minute went by since
        body = json.loads(api.get("/api/stats/runtime?minutes=2&compare=1")[2])
        (w,) = body["tasks"]
        assert w["task"] == "tasks.w" and w["count"] == 3 and w["sum"] is None
        assert 0.0 < w["p50"] <= 0.005 and 0.25 < w["p99"] <= 0.5
        assert body["minutes"] == 2 and body["start"] in (minute - 60, minute)
        (old,) = body["day_before"]["tasks"]
        assert old["count"] == 2 and 2.5 < old["p50"] <= 5.0
        assert body["day_before"]["start"] == body["start"] - 86400
        wide = json.loads(api.get("/api/stats/runtime?minutes=20")[2])
        assert wide["tasks"][0]["count"] == 4 and "day_before" not in wide
        every = json.loads(api.get("/api/stats/runtime")[2])
        assert every["tasks"][0]["count"] == 6 and every["tasks"][0]["sum"] == pytest.approx(17.304)
        for query, param in (
            ("minutes=2881", "minutes"),
            ("compare=1", "compare"),
            ("minutes=5&workername=w@win", "workername"),
        ):
            status, _, error = api.get(f"/api/stats/runtime?{query}")
            assert status == 400 and json.loads(error)["error"].startswith(f"{param}: "), error
    finally:
        api.stop()
        clear_namespace(server, "statswin")


def test_quantile_is_prometheus_histogram_quantile() -> None:
    counts = [0.0] * (len(RUNTIME_BUCKETS) + 1)
    assert quantile(0.5, counts) is None
    counts[0] = 10  # all in (0, 0.005]
    assert quantile(0.5, counts) == pytest.approx(0.0025)
    counts[-1] = 10  # half above the last finite bound: reported as that bound
    assert quantile(0.99, counts) == RUNTIME_BUCKETS[-1]
    assert quantile(0.5, counts) == pytest.approx(0.005)


def test_whoami(api: Api, secured: Api, tmp_path: Path, seeded: tuple[RedisServer, float]) -> None:
    assert json.loads(api.get("/api/whoami")[2]) == {
        "name": "anonymous",
        "role": "admin",
        "can_control": True,
        "can_shutdown": True,
        "read_only": False,
    }
    assert secured.get("/api/whoami")[0] == 401
    rw = json.loads(secured.get("/api/whoami", {"Authorization": f"Bearer {TOKEN}"})[2])
    ro = json.loads(secured.get("/api/whoami", {"Authorization": f"Bearer {RO_TOKEN}"})[2])
    assert rw["can_control"] is True and ro["can_control"] is False and ro["read_only"] is True
    assert (rw["role"], ro["role"], ro["can_shutdown"]) == ("admin", "viewer", False)
    server, _ = seeded
    read_only = Api(api_env(server, NAMESPACE, read_only="1"), tmp_path / "ro.log")
    try:
        assert json.loads(read_only.get("/api/whoami")[2])["can_control"] is False
    finally:
        read_only.stop()


def test_dashboard_files(api: Api, secured: Api) -> None:
    status, headers, body = secured.get("/")  # the page's code is public, its data is not
    # relative, so the page works under POLLEN_URL_PREFIX too
    assert status == 200 and b'src="dashboard/app.js"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["Content-Type"].startswith("text/html")
    for name in FILES:
        if name == "index.html":
            continue
        status, headers, body = secured.get(f"/dashboard/{name}")
        assert status == 200 and body == FILES[name][0], name
        again = secured.get(f"/dashboard/{name}", {"If-None-Match": headers["Etag"]})
        assert again[0] == 304, name
    assert secured.get("/api/stats/workers")[0] == 401
    # the dashboard's file route is public (by name, under any prefix): an unknown file is a
    # 404 that reveals nothing about the cluster
    assert secured.get("/dashboard/nope.js")[0] == 404
    assert api.get("/dashboard/nope.js")[0] == 404
    assert api.get("/dashboard/..%2fui.py")[0] == 404


def test_no_third_party_code() -> None:
    """Every module the page imports is one of its own files."""
    for name, (body, _, _) in FILES.items():
        if name.endswith(".js"):
            for target in re.findall(r"^import\b[^;]*?'([^']+)';", body.decode(), re.M):
                assert target.startswith("./") and target[2:] in FILES, (name, target)
    page = FILES["index.html"][0].decode()
    assert re.findall(r'(?:src|href)="(https?:)?//', page) == []


def test_openapi_lists_the_new_endpoints(api: Api) -> None:
    spec = json.loads(api.get("/api/openapi.json")[2])
    for path in (
        "/api/stats/workers",
        "/api/stats/tasks-per-minute",
        "/api/stats/runtime",
        "/api/stats/wait",
    ):
        assert "get" in spec["paths"][path]
    assert "/api/whoami" in spec["paths"] and "/" in spec["paths"]
