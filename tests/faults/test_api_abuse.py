"""The API under bad input: schemathesis over its own OpenAPI spec against a real API process
on seeded state (no 5xx, no response outside the spec), path tricks, oversized parameters and
headers, bad credentials (all 4xx, the process unharmed), and credentials compared in constant
time (every configured secret compared, with ``hmac.compare_digest``, whatever matches)."""

from __future__ import annotations

import hmac
import json
import math
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from services.api.auth import Credentials
from shared.settings import load
from tests.support.api import Api, seed
from tests.support.dataset import task_events
from tests.support.servers import RedisServer

TOKEN, RO_TOKEN = "fault-token-0123456789", "fault-ro-token"
NAMESPACE = "abuse"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    work = tmp_path_factory.mktemp("abuse")
    server = RedisServer(work / "redis").start()
    seed(server, NAMESPACE, task_events(120, seed=5))
    env = {
        "POLLEN_REDIS_URL": server.url,
        "POLLEN_NAMESPACE": NAMESPACE,
        # control calls go to a broker with no workers on the test's own Redis
        "POLLEN_BROKER_URL": f"redis://127.0.0.1:{server.port}/5",
        "POLLEN_INSPECT_TIMEOUT": "0.3",
        "POLLEN_RESULT_TIMEOUT": "1",
        "POLLEN_API_TOKENS": f"{TOKEN},{RO_TOKEN}:ro",
        "POLLEN_BASIC_AUTH": "admin:s3cret",
        "POLLEN_MAX_PAGE": "50",
    }
    process = Api(env, work / "api.log")
    yield process
    process.stop()
    server.stop()
    # a malformed request is the client's error (answered 400, logged at DEBUG); any
    # traceback is a bug in a handler, and an ERROR line is one a bad client could flood
    output = process.process.output()
    assert "Traceback (most recent call last):" not in output, output[-3000:]
    assert " ERROR " not in output, output[-3000:]


def test_openapi_no_server_error_no_schema_violation(api: Api) -> None:
    """schemathesis generates requests for every operation of /api/openapi.json (valid and
    invalid parameters, with a good token): no answer is a 5xx other than a documented 503,
    or outside the documented schema or content type. (Driven with hypothesis directly:
    schemathesis's pytest plugin does not run under this pytest.)"""
    schema = schemathesis.openapi.from_url(f"{api.url}/api/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        operations += 1

        @settings(
            max_examples=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            # 503 is documented where a dependency is away (no collector for /readyz, no
            # result backend for apply/result); any other 5xx is a bug
            assert response.status_code < 500 or response.status_code == 503, (
                case.method,
                case.formatted_path,
                case.query,
                response.status_code,
                response.text[:500],
            )
            case.validate_response(
                response, checks=[response_schema_conformance, content_type_conformance]
            )

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then fail once
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations >= 25
    assert not failures, "\n\n".join(failures)


#: Numbers that are not numbers, or not in any range a parameter takes.
NUMERIC_EDGES = [
    "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "1e300", str(2**64), str(2**63),
    str(-(2**64)), "-1", "0", "1.5", "0x10", "1_000", "\u0661\u0662", " 7 ", "",
]  # fmt: skip
#: JSON body fields of the publishing calls that take numbers.
BODY_NUMBERS = ["timeout", "countdown", "expires", "time_limit", "soft_time_limit", "priority"]


def test_openapi_numeric_edges_are_4xx(api: Api) -> None:
    """Every query parameter of every operation in /api/openapi.json (and the publishing
    calls' numeric body fields) given each edge number: never a 5xx (but a documented 503),
    always a JSON error for a 4xx, and an answer within the client's timeout (no hang)."""
    schema = schemathesis.openapi.from_url(f"{api.url}/api/openapi.json")
    failures: list[str] = []
    tried = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        parameters = list(operation.iter_parameters())
        path = {p.name: "x" for p in parameters if p.location.value == "path"}
        cases = [
            operation.Case(path_parameters=path, query={p.name: value})
            for p in parameters
            if p.location.value == "query"
            for value in NUMERIC_EDGES
        ]
        if operation.method.upper() == "POST" and "/api/task/" in operation.path:
            cases += [
                operation.Case(
                    path_parameters=path,
                    body={"args": [1], field: _body_value(v)},
                    media_type="application/json",
                )
                for field in BODY_NUMBERS
                for v in NUMERIC_EDGES
            ]
        for case in cases:
            tried += 1
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=15)
            code = response.status_code
            bad = code >= 500 and code != 503
            content_type = " ".join(response.headers.get("content-type", []))
            if code >= 400 and "application/json" not in content_type:
                bad = True
            if bad:
                failures.append(
                    f"{operation.label} {case.query or case.body!r}: {code} {response.text[:200]}"
                )
    assert tried > 500
    assert not failures, "\n".join(failures[:40])


def _body_value(text: str) -> Any:
    """``text`` as a JSON number where it is one JSON can carry, else the string itself."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | float) and math.isfinite(value) else text


def raw_request(api: Api, data: bytes, timeout: float = 10) -> int:
    """Send raw bytes; the status of the answer (0: the server closed without one)."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def get(api: Api, target: str, headers: dict[str, str] | None = None) -> int:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return raw_request(api, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


GOOD = {"Authorization": f"Bearer {TOKEN}"}
PATH_TRICKS = [
    "/../../etc/passwd",
    "/api/../../etc/passwd",
    "/api/task/info/..%2f..%2f..%2fetc%2fpasswd",
    "/api/task/info/%2e%2e/%2e%2e/etc/passwd",
    "//api//tasks",
    "/api/tasks%00",
    "/api/task/info/%00",
    "/api/task/info/%ff%fe",
    "/api/workers?workername=%00%ff",
    "/static/../../../etc/passwd",
    "/api/tasks?limit=-1",
    "/api/tasks?limit=99999999999999999999999",
    "/api/tasks?offset=1e400",
    "/api/tasks?sort_by=" + "-" * 500,
    "/api/tasks?search=" + "(" * 2000,
    "/api/tasks?received_start=9999-99-99%2099:99",
    "/api/events?since=" + "9" * 400,
    "/api/task/info/" + "a" * 7000,
    "/api/tasks?" + "&".join(f"state={i}" for i in range(600)),
    "/api/audit?limit=10&before=" + "9" * 300,
    "*",
]


@pytest.mark.parametrize("target", PATH_TRICKS)
def test_path_tricks_are_4xx(api: Api, target: str) -> None:
    status = get(api, target, GOOD)
    assert 400 <= status < 500 or (status == 200 and target.startswith("/api/tasks?")), (
        target,
        status,
    )
    assert get(api, "/api/workers", GOOD) == 200  # the process is unharmed


@pytest.mark.parametrize(
    "what,headers,target",
    [
        ("long url", GOOD, "/api/tasks?search=" + "x" * 100_000),
        ("long header", {**GOOD, "X-Junk": "y" * 100_000}, "/api/tasks"),
        ("many headers", {**GOOD, **{f"X-H{i}": "v" for i in range(2000)}}, "/api/tasks"),
        ("long token", {"Authorization": "Bearer " + "t" * 60_000}, "/api/tasks"),
    ],
)
def test_oversized_requests_are_4xx(
    api: Api, what: str, headers: dict[str, str], target: str
) -> None:
    status = get(api, target, headers)
    assert 400 <= status < 500 or status == 0, (what, status)
    assert get(api, "/api/workers", GOOD) == 200


def test_malformed_http_is_4xx(api: Api) -> None:
    for data in (
        b"GARBAGE\r\n\r\n",
        b"GET /api/tasks HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
        b"GET /api/tasks HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /api/task/revoke/x HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n",
        b"GET /api/tasks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        status = raw_request(api, data)
        assert status == 0 or 400 <= status < 500, (data[:40], status)
    assert get(api, "/api/workers", GOOD) == 200


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
        f"bearer  {TOKEN[1:]}",
        f"Token {TOKEN}",
        "Basic !!!notbase64",
        "Basic YWRtaW46d3Jvbmc=",  # admin:wrong
        "Basic YWRtaW4=",  # admin, no colon
        "Bearer \u00e9\u00e9",
        "Bearer " + "x" * 4000,
        f"Bearer {TOKEN},{TOKEN}",
    ],
)
def test_bad_credentials_are_401(api: Api, authorization: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    encoded = {k: v.encode().decode("latin-1") for k, v in headers.items()}
    for target in ("/api/tasks", "/api/workers", f"/api/events?token={TOKEN[:-1]}"):
        assert get(api, target, encoded) == 401, (authorization, target)


def test_read_only_token_cannot_control(api: Api) -> None:
    status, _, _ = api.request(
        "POST", "/api/task/revoke/some-task", {"Authorization": f"Bearer {RO_TOKEN}"}
    )
    assert status == 403


def test_credentials_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured secret is compared, with hmac.compare_digest, whichever one matches
    and whatever the length of what was presented: the time does not tell which was close."""
    creds = Credentials.from_settings(
        load(
            {"POLLEN_API_TOKENS": "alpha-token,beta-token:ro,gamma", "POLLEN_BASIC_AUTH": "a:b,c:d"}
        )
    )
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    # services.api.auth calls it as hmac.compare_digest: patched in the hmac module
    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, found in (
        (b"alpha-token", True),
        (b"beta-token", True),
        (b"gamma", True),
        (b"alpha-tokeX", False),
        (b"", False),
        (b"x" * 10_000, False),
    ):
        calls.clear()
        assert (creds.check_token(presented) is not None) is found
        assert [a for a, _ in calls] == [b"alpha-token", b"beta-token", b"gamma"]
    for user, password, found in ((b"a", b"b", True), (b"c", b"d", True), (b"a", b"x", False)):
        calls.clear()
        assert (creds.check_basic(user, password) is not None) is found
        # user and password of every pair, even after a match
        assert len(calls) == 4
