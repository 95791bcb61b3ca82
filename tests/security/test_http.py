"""Each finding of the security review as a crafted HTTP request against the real stack: the
cross-site and Host checks, where a query token counts, what the audit stores, numbers that
are not numbers, unsafe publishing options, bounded answers, work that stops with its client,
the control lanes, and settings that used to fail open."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from services.collector.writer import Writer
from shared.settings import Settings, load
from tests.security.conftest import (
    NAMESPACE,
    PASSWORD,
    RO_PASSWORD,
    RO_USER,
    TOKEN,
    USER,
    WORKER,
    Stack,
    basic,
)
from tests.support import readback
from tests.support.api import Api
from tests.support.servers import PYTHON, ROOT, RedisServer, wait_for

EVIL = "http://evil.example"


def call(
    api: Api,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def error(body: bytes) -> str:
    message: str = json.loads(body)["error"]
    return message


def ws_headers(**extra: str) -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **extra,
    }


# --- cross-site requests ---------------------------------------------------------------------

GROW = f"/api/worker/pool/grow/{WORKER}?n=1"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site", "Origin": EVIL},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://127.0.0.1:1"},  # same host, other port: another origin
    ],
)
def test_cross_site_control_is_refused(stack: Stack, headers: dict[str, str]) -> None:
    before = len(stack.audit())
    for body_type in ("text/plain", "application/x-www-form-urlencoded", "application/json"):
        status, _, body = call(
            stack.open_api,
            "POST",
            "/api/task/send-task/demo.app.add",
            {**headers, "Content-Type": body_type},
            json.dumps({"args": [9191, 1]}).encode(),
        )
        assert status == 403 and "cross-site" in error(body), (status, body)
    status, _, body = call(stack.basic_api, "POST", GROW, {**headers, **basic(USER, PASSWORD)})
    assert status == 403 and "cross-site" in error(body)
    for path in ("/api/tasks/bulk/revoke?dry_run=false", "/api/tasks/bulk/resend?dry_run=false"):
        status, _, body = call(stack.open_api, "POST", path, headers, b"")
        assert status == 403 and "cross-site" in error(body), (path, status, body)
    assert len(stack.audit()) == before  # refused before any control code ran


@pytest.mark.parametrize(
    "headers",
    [
        {},  # a script
        {"Sec-Fetch-Site": "same-origin", "Origin": EVIL},  # the browser's word wins
        {"Sec-Fetch-Site": "none"},  # typed by the user
        {"Origin": "__SELF__"},  # an older browser on the API's own page
    ],
)
def test_same_origin_and_scripts_pass(stack: Stack, headers: dict[str, str]) -> None:
    api = stack.open_api
    if headers.get("Origin") == "__SELF__":
        headers = {"Origin": api.url}
    status, _, body = call(api, "POST", GROW, headers)
    assert status == 200, (status, body)
    status, _, body = call(api, "POST", f"/api/worker/pool/shrink/{WORKER}?n=1", headers)
    assert status == 200, (status, body)


def test_listed_origins_may_control(stack: Stack, tmp_path: Any) -> None:
    api = Api(stack.env, tmp_path / "api.log", POLLEN_CORS_ORIGINS="https://ops.example")
    try:
        status, headers, _ = call(api, "POST", GROW, {"Origin": "https://ops.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://ops.example"
        call(api, "POST", f"/api/worker/pool/shrink/{WORKER}?n=1")
        status, _, _ = call(api, "POST", GROW, {"Origin": "https://other.example"})
        assert status == 403
    finally:
        api.stop()


def test_star_cors_reads_but_never_controls(stack: Stack, tmp_path: Any) -> None:
    api = Api(stack.env, tmp_path / "api.log", POLLEN_CORS_ORIGINS="*")
    try:
        status, headers, _ = call(api, "GET", "/api/workers", {"Origin": EVIL})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        status, _, _ = call(api, "POST", GROW, {"Origin": EVIL})
        assert status == 403
    finally:
        api.stop()


def _websocket_status(api: Api, path: str, headers: dict[str, str]) -> int:
    status, _, _ = call(api, "GET", path, ws_headers(**headers), timeout=10)
    return status


def test_cross_site_websocket_is_refused(stack: Stack) -> None:
    for api, auth in ((stack.open_api, {}), (stack.basic_api, basic(USER, PASSWORD))):
        for bad in ({"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            assert _websocket_status(api, "/api/events?since=0-0", {**bad, **auth}) == 403
            assert _websocket_status(api, "/api/task/events/task-succeeded/", bad | auth) == 403
        assert _websocket_status(api, "/api/events", {"Origin": api.url, **auth}) == 101
        assert _websocket_status(api, "/api/events", auth) == 101


# --- Host (DNS rebinding) --------------------------------------------------------------------


def test_open_api_answers_loopback_hosts_only(stack: Stack, tmp_path: Any) -> None:
    api = stack.open_api
    for host in ("evil.example", "evil.example:80", "10.0.0.1", "pollen.internal"):
        status, _, body = call(api, "GET", "/api/workers", {"Host": host})
        assert status == 403 and "POLLEN_ALLOWED_HOSTS" in error(body), (host, body)
    for host in ("localhost", f"localhost:{api.port}", "127.0.0.1", "[::1]:80", "a.localhost"):
        assert call(api, "GET", "/api/workers", {"Host": host})[0] == 200, host
    allowed = Api(stack.env, tmp_path / "api.log", POLLEN_ALLOWED_HOSTS="pollen.internal")
    try:
        assert call(allowed, "GET", "/api/workers", {"Host": "pollen.internal:5555"})[0] == 200
        assert call(allowed, "GET", "/api/workers", {"Host": "evil.example"})[0] == 403
    finally:
        allowed.stop()
    # with credentials the Host does not matter: a rebinding page has none of them
    status, _, _ = call(
        stack.basic_api, "GET", "/api/workers", {"Host": "evil.example", **basic(USER, PASSWORD)}
    )
    assert status == 200


# --- credentials: where a query token counts, what the audit keeps ---------------------------


def test_query_token_only_on_the_websocket_handshake(stack: Stack) -> None:
    api = stack.both_api
    upgrade = ws_headers()
    assert call(api, "GET", f"/api/workers?token={TOKEN}", upgrade)[0] == 401
    assert call(api, "GET", f"/api/workers?token={TOKEN}")[0] == 401
    assert call(api, "POST", f"{GROW}&token={TOKEN}", upgrade)[0] == 401
    assert _websocket_status(api, f"/api/events?token={TOKEN}", {}) == 101


def test_audit_never_stores_a_credential(stack: Stack) -> None:
    api = stack.both_api
    status, _, _ = call(api, "POST", f"{GROW}&token={TOKEN}", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    call(api, "POST", f"/api/worker/pool/shrink/{WORKER}?n=1", {"Authorization": f"Bearer {TOKEN}"})
    raw = json.dumps(stack.audit())
    assert TOKEN not in raw and PASSWORD not in raw
    logs = "".join(p.read_text() for p in stack.workdir.glob("*.log"))
    assert TOKEN not in logs and PASSWORD not in logs


# --- numbers that are not numbers, ids out of range ------------------------------------------

TASK = "/api/task/send-task/demo.app.add"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/task/result/some-id?timeout=nan", None),
        ("GET", "/api/task/result/some-id?timeout=inf", None),
        ("GET", "/api/task/result/some-id?timeout=-1", None),
        ("GET", "/api/task/result/some-id?timeout=1e400", None),
        ("POST", "/api/task/apply/demo.app.add", {"args": [1, 2], "timeout": "nan"}),
        ("POST", "/api/task/apply/demo.app.add", {"args": [1, 2], "timeout": 1e308}),
        ("POST", TASK, {"args": [1, 2], "countdown": 1e300}),
        ("POST", TASK, {"args": [1, 2], "expires": 1e300}),
        ("POST", TASK, {"args": [1, 2], "expires": "1e300"}),
        ("POST", TASK, {"args": [1, 2], "time_limit": -5}),
        ("POST", TASK, {"args": [1, 2], "priority": 10**6}),
        ("POST", f"/api/task/timeout/demo.app.add?workername={WORKER}&hard=nan", None),
        ("POST", f"/api/worker/pool/grow/{WORKER}?n={2**64}", None),
        ("GET", f"/api/tasks?offset={2**64}", None),
        ("GET", f"/api/tasks?limit={2**64}", None),
        ("GET", "/api/tasks?cursor=AAAA", None),
        ("GET", "/api/tasks?cursor=" + "A" * 5000, None),
        ("GET", "/api/audit?before=" + "9" * 30, None),
        ("GET", "/api/stats/tasks-per-minute?minutes=" + "9" * 30, None),
    ],
)
def test_bad_numbers_are_a_400(
    stack: Stack, method: str, path: str, body: dict[str, Any] | None
) -> None:
    raw = None if body is None else json.dumps(body).encode()
    status, headers, answer = call(stack.open_api, method, path, body=raw, timeout=10)
    assert status == 400, (status, answer[:300])
    assert headers["Content-Type"].startswith("application/json") and error(answer)


def test_forged_cursor_is_a_400(stack: Stack) -> None:
    """A cursor that decodes and fits the query's shape but holds a score Redis refuses."""
    from services.api.query import TaskQuery
    from services.api.query.cursor import CursorData, encode_cursor

    shape = TaskQuery(limit=10).shape()
    for score in ("nan", "abc", ""):
        cursor = encode_cursor(CursorData(1, shape, ["ts"], score, b"x"))
        status, _, body = call(stack.open_api, "GET", f"/api/tasks?limit=10&cursor={cursor}")
        assert status == 400 and "cursor" in error(body), (score, body)


@pytest.mark.parametrize(
    "since",
    ["99999999999999999999999-0", f"{2**64}-0", "1-" + str(2**64), "\u0661\u0662-0", "-1"],
)
def test_out_of_range_websocket_since_is_a_400(stack: Stack, since: str) -> None:
    from urllib.parse import quote

    status, _, body = call(
        stack.open_api, "GET", f"/api/events?since={quote(since)}", ws_headers(), timeout=10
    )
    assert status == 400 and "since" in error(body), (status, body)


# --- publishing options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"headers": {"task": "demo.app.fail"}},
        {"headers": {"id": "forged"}},
        {"headers": {"argsrepr": "(1, 2)"}},
        {"exchange": "celeryev"},
        {"exchange": "celery.pidbox"},
        {"queue": "celeryev.0f7e"},
        {"routing_key": f"{WORKER}.celery.pidbox"},
    ],
)
def test_unsafe_publishing_options_are_refused(stack: Stack, options: dict[str, Any]) -> None:
    body = json.dumps({"args": [7070, 1], **options}).encode()
    status, _, answer = call(stack.open_api, "POST", TASK, body=body)
    assert status == 400, (status, answer)


def test_audit_records_what_was_sent(stack: Stack) -> None:
    body = {"args": [8080, 1], "headers": {"x-team": "ops"}, "countdown": 0}
    status, _, answer = call(stack.open_api, "POST", TASK, body=json.dumps(body).encode())
    assert status == 200
    task_id = json.loads(answer)["task-id"]
    entry = next(e for e in stack.audit() if e.get("sent", {}).get("task_id") == task_id)
    assert entry["sent"]["task"] == "demo.app.add" and entry["sent"]["args"] == [8080, 1]
    assert entry["sent"]["options"] == {"headers": {"x-team": "ops"}, "countdown": 0}
    wait_for(
        lambda: any(
            t["uuid"] == task_id and t["state"] == "SUCCESS"
            for t in stack.tasks_named("demo.app.add")
        ),
        timeout=60,
        message="the audited task ran as audited",
    )


# --- work that stops with its client ---------------------------------------------------------


def _reads(server: RedisServer) -> int:
    stats = redis.Redis(port=server.port).info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_get", "cmdstat_mget"))


def test_result_wait_stops_when_the_client_leaves(stack: Stack, tmp_path: Path) -> None:
    # a result backend of its own, so every read it counts is this API's poller
    backend = RedisServer(tmp_path / "backend").start()
    api = Api(stack.env, tmp_path / "api.log", POLLEN_RESULT_BACKEND=backend.url)
    try:
        sock = socket.create_connection(("127.0.0.1", api.port))
        sock.sendall(
            b"GET /api/task/result/never-finishes?timeout=50 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        first = _reads(backend)
        wait_for(lambda: _reads(backend) > first + 2, timeout=10, message="the poller reading")
        sock.close()
        # a fixed wait proves an absence: the poller (every <= 0.5 s) must have stopped
        time.sleep(1.0)
        settled = _reads(backend)
        time.sleep(2.0)
        assert _reads(backend) == settled
    finally:
        api.stop()
        backend.stop()


def _fill(client: redis.Redis, settings: Settings, prefix: str, n: int) -> None:
    """``n`` received tasks named ``<prefix>-<i>`` through the write path, a batch at a time."""
    now = time.time()
    events = [
        {
            "type": "task-received",
            "uuid": f"{prefix}-{i}",
            "name": "t",
            "hostname": "w@h",
            "timestamp": now + i * 1e-4,
            "clock": i,
            "args": "[]",
            "kwargs": "{}",
        }
        for i in range(n)
    ]
    writer = Writer(client, settings)
    for i in range(0, len(events), 1000):
        readback.apply(writer, events[i : i + 1000], now)


def test_search_stops_when_the_client_leaves(stack: Stack, tmp_path: Path) -> None:
    """A search that examines many tasks: cut off by its client, it stops calling Redis long
    before it would have finished. Counted on a Redis of its own, so every script call is this
    API's search; compared with what the same search costs when its client waits."""
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis(port=server.port)
    settings = load({"POLLEN_REDIS_URL": server.url, "POLLEN_NAMESPACE": "big"})
    _fill(client, settings, "big", 60_000)
    env = {**stack.env, "POLLEN_NAMESPACE": "big", "POLLEN_REDIS_URL": server.url}
    api = Api(
        env, tmp_path / "api.log", POLLEN_QUERY_TIME_LIMIT="120", POLLEN_SEARCH_SCAN_LIMIT="1000000"
    )

    def scripts() -> int:
        stats = client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if "eval" in k or "fcall" in k)

    def settled() -> int:
        """The script count once it has not moved for a second (the search is over)."""
        last = [scripts(), time.monotonic()]

        def still() -> bool:
            now_count = scripts()
            if now_count != last[0]:
                last[:] = [now_count, time.monotonic()]
            return time.monotonic() - last[1] >= 1.0

        wait_for(still, timeout=120, interval=0.1, message="the script calls to stop")
        return int(last[0])

    terms = "+".join(f"kwargs:k{i}=v{i}" for i in range(40))
    path = f"/api/tasks?search={terms}"
    try:
        before = scripts()
        assert call(api, "GET", path, timeout=120)[0] == 200
        full = settled() - before  # what the whole search costs
        assert full > 40, full
        start = scripts()
        sock = socket.create_connection(("127.0.0.1", api.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        wait_for(lambda: scripts() > start + 3, timeout=20, message="the search scanning")
        sock.close()
        cut = settled() - start
        assert cut < full / 2, (cut, full)
    finally:
        api.stop()
        client.close()
        server.stop()


def test_query_time_is_bounded(stack: Stack) -> None:
    """``POLLEN_QUERY_TIME_LIMIT`` cuts a long scan short and says so. More tasks than one scan
    chunk reads (``CHUNK``): the search cannot end within its first read, and the limit is
    checked before the next one (a small namespace could be scanned whole within 1 ms)."""
    from services.api.query.walk import CHUNK

    client = redis.Redis(port=stack.redis.port, db=1)
    settings = stack.state_settings("slow")
    _fill(client, settings, "slow", CHUNK + 5000)
    env = {**stack.env, "POLLEN_NAMESPACE": "slow"}
    api = Api(env, stack.workdir / "api-short.log", POLLEN_QUERY_TIME_LIMIT="0.001")
    try:
        status, headers, _ = call(api, "GET", "/api/tasks?search=kwargs:nothing=here&limit=5")
        assert status == 200 and headers["X-Pollen-Scan-Capped"] == "true"
    finally:
        api.stop()
        client.close()


# --- bounded answers -------------------------------------------------------------------------


def test_tasks_per_minute_and_metrics_are_bounded(stack: Stack) -> None:
    from services.api.stats import MAX_SERIES

    client = redis.Redis(port=stack.redis.port, db=1)
    settings = stack.state_settings("amp")
    now = time.time()
    names = MAX_SERIES + 50
    events = [
        {
            "type": "task-succeeded",
            "uuid": f"amp-{i}",
            "name": f"task.n{i}",
            "hostname": "w@h",
            "timestamp": now,
            "clock": i,
            "runtime": 0.1,
        }
        for i in range(names)
    ]
    try:
        readback.apply(Writer(client, settings), events, now)
        env = {**stack.env, "POLLEN_NAMESPACE": "amp"}
        api = Api(env, stack.workdir / "api-amp.log", POLLEN_METRICS_MAX_SAMPLES="100")
        try:
            status, _, body = call(api, "GET", "/api/stats/tasks-per-minute?minutes=2880")
            answer = json.loads(body)
            assert status == 200 and len(answer["series"]) == MAX_SERIES
            assert answer["series_total"] == names
            status, _, body = call(api, "GET", "/metrics")
            text = body.decode()
            samples = [x for x in text.splitlines() if x and not x.startswith("#")]
            assert len(samples) == 101  # the limit, plus the dropped count itself
            dropped = float(text.split("\npollen_metrics_samples_dropped ")[1].split()[0])
            assert dropped > 0
        finally:
            api.stop()
    finally:
        for key in client.scan_iter(match="amp:*", count=1000):
            client.delete(key)
        client.close()


# --- control lanes: forged workers cannot starve the real ones -------------------------------


def test_forged_workers_cannot_starve_control(stack: Stack) -> None:
    client = redis.Redis(port=stack.redis.port, db=1)
    settings = stack.state_settings(NAMESPACE)
    now = time.time()
    ghosts = [f"ghost{i}@nowhere" for i in range(12)]
    readback.apply(
        Writer(client, settings),
        [
            {"type": "worker-heartbeat", "hostname": g, "timestamp": now, "clock": i, "freq": 2.0}
            for i, g in enumerate(ghosts)
        ],
        now,
    )
    client.close()

    api = stack.open_api
    with concurrent.futures.ThreadPoolExecutor(len(ghosts) + 1) as pool:
        stuck = [
            pool.submit(call, api, "POST", f"/api/worker/pool/grow/{g}?n=1", None, None, 60)
            for g in ghosts
        ]
        # the forged workers' calls wait for replies that never come; the real one is answered
        status, _, body = call(api, "POST", GROW)
        assert status == 200, (status, body)
        call(api, "POST", f"/api/worker/pool/shrink/{WORKER}?n=1")
        outcomes = sorted({f.result()[0] for f in stuck})
    assert set(outcomes) <= {503, 504}, outcomes


# --- settings that used to fail open ---------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("POLLEN_API_TOKENS", "sekrit-value:RO!"),
        ("POLLEN_API_TOKENS", "sekrit-value:maybe"),
        ("POLLEN_BASIC_AUTH", "sekrit-value:"),
        ("POLLEN_BASIC_AUTH", ":sekrit-value"),
        ("POLLEN_BASIC_AUTH", "sekrit-value"),
    ],
)
def test_bad_credential_settings_stop_the_service(variable: str, value: str) -> None:
    for service in ("api", "collector", "enabler"):
        done = subprocess.run(
            [PYTHON, "-m", f"services.{service}"],
            env={**os.environ, variable: value, "POLLEN_API_HOST": "127.0.0.1"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (service, done.stderr)
        assert variable in done.stderr and "sekrit" not in done.stderr + done.stdout


def test_credential_modes() -> None:
    from services.api.auth import Credentials

    creds = Credentials.from_settings(
        load({"POLLEN_API_TOKENS": "a:RO,b:rw,c,d:op", "POLLEN_BASIC_AUTH": "u:p:ro,v:q:ro:rw"})
    )
    assert [(t.decode(), role) for t, role in creds.tokens] == [
        ("a", "viewer"),
        ("b", "admin"),
        ("c", "admin"),
        ("d", "operator"),
    ]
    ro_user = creds.check_basic(b"u", b"p")
    assert ro_user is not None and not ro_user.can_control
    literal = creds.check_basic(b"v", b"q:ro")
    assert literal is not None and literal.can_control


def test_read_only_basic_user_cannot_control(stack: Stack) -> None:
    status, _, body = call(stack.basic_api, "POST", GROW, basic(RO_USER, RO_PASSWORD))
    assert status == 403 and "read-only" in error(body)
    assert call(stack.basic_api, "GET", "/api/workers", basic(RO_USER, RO_PASSWORD))[0] == 200


def test_one_challenge_per_scheme(stack: Stack) -> None:
    status, headers, _ = call(stack.both_api, "GET", "/api/workers")
    assert status == 401
    assert headers.get_all("WWW-Authenticate") == [
        'Basic realm="pollen", charset="UTF-8"',
        'Bearer realm="pollen"',
    ]


# --- headers ---------------------------------------------------------------------------------


def test_protective_headers(stack: Stack) -> None:
    for path in ("/api/workers", "/api/tasks?limit=1", "/metrics", "/api/nothing", "/"):
        _, headers, _ = call(stack.open_api, "GET", path)
        assert headers["X-Content-Type-Options"] == "nosniff", path
    _, headers, _ = call(stack.open_api, "GET", "/")
    csp = headers["Content-Security-Policy"]
    assert "connect-src 'self';" in csp and "ws:" not in csp and "wss:" not in csp


def test_offsets_across_shards_and_name_groups_are_bounded(stack: Stack, tmp_path: Path) -> None:
    """A deep offset over several shards is skipped in the API: it counts against
    POLLEN_SEARCH_SCAN_LIMIT like a scan; many name groups are bounded by the time limit."""
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis(port=server.port)
    settings = load(
        {"POLLEN_REDIS_URL": server.url, "POLLEN_NAMESPACE": "deep", "POLLEN_SHARDS": "3"}
    )
    now = time.time()
    events = [
        {
            "type": "task-received",
            "uuid": f"deep-{i}",
            "name": f"name.{i % 500:04d}",
            "hostname": "w@h",
            "timestamp": now + i * 1e-4,
            "clock": i,
        }
        for i in range(3000)
    ]
    writer = Writer(client, settings)
    for i in range(0, len(events), 1000):
        readback.apply(writer, events[i : i + 1000], now)
    env = {**stack.env, "POLLEN_NAMESPACE": "deep", "POLLEN_REDIS_URL": server.url}
    api = Api(env, tmp_path / "api.log", POLLEN_SHARDS="3", POLLEN_SEARCH_SCAN_LIMIT="100")
    slow = Api(env, tmp_path / "slow.log", POLLEN_SHARDS="3", POLLEN_QUERY_TIME_LIMIT="0.001")
    try:
        status, headers, body = call(api, "GET", "/api/tasks?offset=2000&limit=5")
        assert status == 200 and headers["X-Pollen-Scan-Capped"] == "true"
        assert int(headers["X-Pollen-Examined"]) <= 100 + 5 and json.loads(body) == {}
        # within the budget the same query answers in full
        status, headers, body = call(api, "GET", "/api/tasks?offset=50&limit=5")
        assert headers["X-Pollen-Scan-Capped"] == "false" and len(json.loads(body)) == 5
        status, headers, _ = call(slow, "GET", "/api/tasks?sort_by=name&state=RECEIVED&limit=900")
        assert status == 200 and headers["X-Pollen-Scan-Capped"] == "true"
    finally:
        slow.stop()
        api.stop()
        client.close()
        server.stop()
