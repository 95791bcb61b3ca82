"""Auth (none, bad, good; bearer, read-only, basic; WebSocket token), bind refusal, CORS,
every bad parameter as a 400 naming it, page and scan caps, OpenAPI coverage."""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from services.api.app import make_app
from services.api.auth import PRINCIPAL_KEY, Credentials, require_role
from services.api.errors import ApiError
from shared.settings import load
from tests.support.api import Api, api_env, clear_namespace, seed
from tests.support.dataset import task_events
from tests.support.servers import PYTHON, ROOT, RedisServer, free_port

NAMESPACE = "sec"
EVENTS = task_events(60, seed=3)
TOKEN, RO_TOKEN = "s3cret-token", "read-only-token"


@pytest.fixture(scope="module")
def seeded(redis_server: RedisServer) -> Iterator[RedisServer]:
    clear_namespace(redis_server, NAMESPACE)
    seed(redis_server, NAMESPACE, EVENTS)
    yield redis_server
    clear_namespace(redis_server, NAMESPACE)


@pytest.fixture(scope="module")
def secured(seeded: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    env = api_env(
        seeded,
        NAMESPACE,
        api_tokens=f"{TOKEN},{RO_TOKEN}:ro",
        basic_auth="admin:pa:ss",
        cors_origins="https://dash.example",
        max_page="25",
        search_scan_limit="40",
    )
    api = Api(env, tmp_path_factory.mktemp("secured") / "api.log")
    yield api
    api.stop()


@pytest.fixture(scope="module")
def open_api(seeded: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    api = Api(api_env(seeded, NAMESPACE), tmp_path_factory.mktemp("open") / "api.log")
    yield api
    api.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- authentication --------------------------------------------------------------------------


def test_no_credentials_configured_serves_everyone(open_api: Api) -> None:
    assert open_api.get("/api/tasks?limit=1")[0] == 200


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "authentication required"),
        (bearer("wrong"), 401, "invalid credentials"),
        (bearer(TOKEN[:-1]), 401, "invalid credentials"),
        ({"Authorization": "Bearer"}, 401, "invalid credentials"),
        (basic("admin", "wrong"), 401, "invalid credentials"),
        (basic("nobody", "pa:ss"), 401, "invalid credentials"),
        ({"Authorization": "Basic !!notbase64"}, 401, "invalid credentials"),
        (bearer(TOKEN), 200, None),
        (bearer(RO_TOKEN), 200, None),
        (basic("admin", "pa:ss"), 200, None),
    ],
)
def test_credentials(secured: Api, headers: dict[str, str], status: int, message: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", secured.port, timeout=10)
    try:
        conn.request("GET", "/api/tasks?limit=2", headers=headers)
        resp = conn.getresponse()
        got, challenges, body = resp.status, resp.headers.get_all("WWW-Authenticate"), resp.read()
    finally:
        conn.close()
    assert got == status
    if status == 401:
        assert json.loads(body) == {"error": message}
        # one challenge per scheme, Basic first (browsers prompt only for a parsable one)
        assert challenges == ['Basic realm="pollen", charset="UTF-8"', 'Bearer realm="pollen"']


def test_token_in_query_only_for_websockets(secured: Api) -> None:
    assert secured.get(f"/api/tasks?token={TOKEN}")[0] == 401


def test_health_and_metrics_open_by_default(secured: Api) -> None:
    for path in ("/healthz", "/metrics", "/healthcheck", "/api/openapi.json"):
        assert secured.get(path)[0] == 200, path
    assert secured.get("/readyz")[0] == 503  # no collector: open, and not ready
    assert secured.get("/api/workers")[0] == 401


def test_closed_health(seeded: RedisServer, tmp_path: Path) -> None:
    env = api_env(seeded, NAMESPACE, api_tokens=TOKEN, open_health="false")
    api = Api(env, tmp_path / "api.log")
    try:
        assert api.get("/metrics")[0] == 401
        assert api.get("/metrics", bearer(TOKEN))[0] == 200
    finally:
        api.stop()


async def test_websocket_auth(secured: Api) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{secured.url}/api/events")
        assert refused.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"{secured.url}/api/events?token=nope")
        ws = await session.ws_connect(f"{secured.url}/api/events?token={RO_TOKEN}")
        await ws.close()
        ws = await session.ws_connect(f"{secured.url}/api/events", headers=bearer(TOKEN))
        await ws.close()


def _process(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "services.api"],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_refuses_open_non_loopback_bind(seeded: RedisServer) -> None:
    env = api_env(seeded, NAMESPACE, api_host="0.0.0.0", api_port=str(free_port()))
    done = _process(env)
    assert done.returncode == 2
    assert "refusing to bind" in done.stderr and "POLLEN_UNAUTHENTICATED_API" in done.stderr


def test_unauthenticated_api_flag_allows_open_bind(seeded: RedisServer, tmp_path: Path) -> None:
    env = api_env(seeded, NAMESPACE, api_host="0.0.0.0", unauthenticated_api="1")
    api = Api(env, tmp_path / "api.log")
    try:
        assert api.get("/api/tasks?limit=1")[0] == 200
    finally:
        api.stop()


def test_bad_basic_auth_setting_stops_the_service(seeded: RedisServer) -> None:
    done = _process(api_env(seeded, NAMESPACE, basic_auth="no-colon-here"))
    assert done.returncode == 2 and "POLLEN_BASIC_AUTH" in done.stderr


def test_require_role() -> None:
    """The helper the control endpoints use: read-only credentials and read-only mode refuse."""
    settings = load({"POLLEN_API_TOKENS": f"{TOKEN},{RO_TOKEN}:ro"})
    creds = Credentials.from_settings(settings)
    rw, ro = creds.check_token(TOKEN.encode()), creds.check_token(RO_TOKEN.encode())
    assert rw is not None and ro is not None and creds.check_token(b"x") is None
    request = make_mocked_request("POST", "/api/worker/shutdown/x")
    request[PRINCIPAL_KEY] = rw
    assert require_role(request, settings) == rw
    request[PRINCIPAL_KEY] = ro
    with pytest.raises(ApiError) as refused:
        require_role(request, settings)
    assert refused.value.status == 403
    request[PRINCIPAL_KEY] = rw
    with pytest.raises(ApiError) as read_only:
        require_role(request, load({"POLLEN_READ_ONLY": "1"}))
    assert read_only.value.status == 403 and "read only" in read_only.value.message


# --- CORS -------------------------------------------------------------------------------------


def test_cors(secured: Api) -> None:
    allowed = {"Origin": "https://dash.example", **bearer(TOKEN)}
    _, headers, _ = secured.get("/api/tasks?limit=1", allowed)
    assert headers["Access-Control-Allow-Origin"] == "https://dash.example"
    assert "X-Pollen-Next-Cursor" in headers["Access-Control-Expose-Headers"]
    _, headers, _ = secured.get(
        "/api/tasks?limit=1", {"Origin": "https://evil.example", **bearer(TOKEN)}
    )
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = secured.request(
        "OPTIONS",
        "/api/tasks",
        {"Origin": "https://dash.example", "Access-Control-Request-Method": "GET"},
    )
    assert status == 204 and "Authorization" in headers["Access-Control-Allow-Headers"]
    status, _, _ = secured.request(
        "OPTIONS",
        "/api/tasks",
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert status == 403


# --- bad input --------------------------------------------------------------------------------

BAD = [
    ("/api/tasks?limit=abc", "limit"),
    ("/api/tasks?limit=-1", "limit"),
    ("/api/tasks?offset=1.5", "offset"),
    ("/api/tasks?offset=-3", "offset"),
    ("/api/tasks?sort_by=uuid", "sort_by"),
    ("/api/tasks?received_start=yesterday", "received_start"),
    ("/api/tasks?received_end=2024-13-01%2010:00", "received_end"),
    ("/api/tasks?started_start=nan", "started_start"),
    ("/api/tasks?started_end=10:00", "started_end"),
    ("/api/tasks?search=(unclosed", "search"),
    ("/api/tasks?search=NOT%20this", "search"),
    ("/api/tasks?search=ab", "search"),
    ("/api/tasks?cursor=garbage!", "cursor"),
    ("/api/workers?status=maybe", "status"),
    ("/api/workers?refresh=2", "refresh"),
    ("/api/events?since=yesterday", "since"),
    ("/api/events?since=1-0,2-0", "since"),
]


@pytest.mark.parametrize(("path", "param"), BAD)
def test_bad_parameter_is_400_naming_it(open_api: Api, path: str, param: str) -> None:
    status, headers, body = open_api.get(path)
    assert status == 400, body
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"].startswith(f"{param}: ")


def test_search_error_message_is_flowers(open_api: Api) -> None:
    from flower.utils.search import QuerySyntaxError, parse_query

    for query in ("(unclosed", "a OR", "name:", "-neg", '"open', "x" * 3000, "((((((deep))))))"):
        with pytest.raises(QuerySyntaxError) as flower_error:
            parse_query(query)
        _, _, body = open_api.get(f"/api/tasks?search={urllib.parse.quote(query)}")
        assert json.loads(body) == {"error": f"search: {flower_error.value}"}


def test_cursor_of_another_query_is_400(open_api: Api) -> None:
    _, headers, _ = open_api.get("/api/tasks?limit=2&state=SUCCESS")
    cursor = headers["X-Pollen-Next-Cursor"]
    status, _, body = open_api.get(f"/api/tasks?limit=2&state=FAILURE&cursor={cursor}")
    assert status == 400 and json.loads(body)["error"].startswith("cursor: ")
    assert open_api.get(f"/api/tasks?limit=2&state=SUCCESS&cursor={cursor}")[0] == 200


def test_unknown_route_and_method(open_api: Api) -> None:
    status, _, body = open_api.get("/api/nope")
    assert status == 404 and json.loads(body) == {"error": "not found"}
    status, headers, body = open_api.request("DELETE", "/api/tasks")
    assert status == 405 and "error" in json.loads(body) and "GET" in headers["Allow"]


def test_unknown_worker_is_404(open_api: Api) -> None:
    status, _, body = open_api.get("/api/workers?workername=celery@nowhere")
    assert status == 404 and json.loads(body) == {"error": "Unknown worker 'celery@nowhere'"}


def test_websocket_endpoint_without_upgrade_is_400(open_api: Api) -> None:
    status, _, body = open_api.get("/api/events")
    assert status == 400 and "WebSocket" in json.loads(body)["error"]


# --- caps -------------------------------------------------------------------------------------


def test_page_cap(secured: Api) -> None:
    _, headers, body = secured.get("/api/tasks", bearer(TOKEN))
    assert len(json.loads(body)) == 25 and headers["X-Pollen-Page-Capped"] == "25"
    _, headers, body = secured.get("/api/tasks?limit=500", bearer(TOKEN))
    assert len(json.loads(body)) == 25 and headers["X-Pollen-Page-Capped"] == "25"
    _, headers, body = secured.get("/api/tasks?limit=10", bearer(TOKEN))
    assert len(json.loads(body)) == 10 and "X-Pollen-Page-Capped" not in headers


def test_scan_cap(secured: Api, open_api: Api) -> None:
    query = "/api/tasks?limit=25&search=nothing-matches-this"
    _, headers, body = secured.get(query, bearer(TOKEN))
    assert json.loads(body) == {}
    assert headers["X-Pollen-Scan-Capped"] == "true" and headers["X-Pollen-Examined"] == "40"
    _, headers, _ = open_api.get(query)
    assert headers["X-Pollen-Scan-Capped"] == "false"
    assert int(headers["X-Pollen-Examined"]) == len({e["uuid"] for e in EVENTS if "uuid" in e})


# --- OpenAPI ----------------------------------------------------------------------------------


def test_every_route_is_documented(open_api: Api) -> None:
    app = make_app(load({"POLLEN_NAMESPACE": NAMESPACE}))
    registered = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    spec = json.loads(open_api.get("/api/openapi.json")[2])
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert registered <= documented, registered - documented
    assert documented <= registered, documented - registered
    assert spec["openapi"].startswith("3.")
