"""SSO through a trusted proxy: Debian's nginx signs users in (basic auth against its own user
file, as oauth2-proxy signs them in against a provider) and passes who they are in
``X-Forwarded-Email`` and ``X-Forwarded-Groups``. Pollen maps users and groups to roles: a
viewer cannot control, an operator cannot shut workers down, an admin can; the dashboard shows
who is signed in and hides what the role cannot do; the audit names the real user and role.
Headers from anywhere but the proxy's address count for nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import expect

from services.collector.writer import Writer
from tests.security.conftest import NAMESPACE, WORKER, Stack
from tests.security.test_http import call
from tests.support import readback
from tests.support.api import Api
from tests.support.servers import PYTHON, ROOT, free_port, run_nginx

#: nginx's users: name -> (password, groups it forwards)
USERS = {"viv": ("viv-pw", "readers"), "olga": ("olga-pw", "ops"), "ada": ("ada-pw", "sre,ops")}
ROLES = "admin=group:sre;operator=group:ops"
GHOST = "ghost-for-shutdown@nowhere"


def _sso_env() -> dict[str, str]:
    return {
        "POLLEN_AUTH_PROXY_USER_HEADER": "X-Forwarded-Email",
        "POLLEN_AUTH_PROXY_GROUPS_HEADER": "X-Forwarded-Groups",
        "POLLEN_AUTH_PROXY_ADDRESSES": "127.0.0.1/32,::1",
        "POLLEN_ROLES": ROLES,
    }


@pytest.fixture(scope="module")
def sso(stack: Stack) -> Iterator[tuple[Api, str]]:
    """The API trusting 127.0.0.1 and an nginx in front of it that signs users in."""
    api = Api(stack.env, stack.workdir / "api-sso.log", **_sso_env())
    work = stack.workdir / "nginx-sso"
    work.mkdir(exist_ok=True)
    (work / "users").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, (p, _) in USERS.items()))
    groups = "".join(f'    {u} "{g}";\n' for u, (_, g) in USERS.items())
    port = free_port()
    http = f"""
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  map $remote_user $sso_groups {{
{groups}    default "";
  }}
  server {{
    listen 127.0.0.1:{port};
    auth_basic "company sso";
    auth_basic_user_file {work / "users"};
    location / {{
      proxy_pass http://127.0.0.1:{api.port};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      # who signed in: set by the proxy, whatever the client sent
      proxy_set_header X-Forwarded-Email $remote_user@example.com;
      proxy_set_header X-Forwarded-Groups $sso_groups;
      proxy_set_header Authorization "";
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
    }}
  }}
"""
    # a worker known only from its events, for the admin's shutdown (no real one is stopped)
    client = redis.Redis(port=stack.redis.port, db=1)
    now = time.time()
    readback.apply(
        Writer(client, stack.state_settings(NAMESPACE)),
        [{"type": "worker-heartbeat", "hostname": GHOST, "timestamp": now, "clock": 1}],
        now,
    )
    client.close()
    nginx = run_nginx(work, http, port)  # nginx's own 401 until a user signs in
    try:
        yield api, nginx.url
    finally:
        nginx.stop()
        api.stop()


def _post(page: Any, path: str) -> int:
    status: int = page.evaluate("async (p) => (await fetch(p, {method: 'POST'})).status", path)
    return status


def _audit(api: Api, action: str) -> list[dict[str, Any]]:
    status, _, body = call(
        api,
        "GET",
        "/api/audit",
        {"X-Forwarded-Email": "ada@example.com", "X-Forwarded-Groups": "sre"},
    )
    assert status == 200, body
    entries: list[dict[str, Any]] = json.loads(body)["entries"]
    return [e for e in entries if e["action"] == action]


@pytest.mark.parametrize(
    ("user", "role"), [("viv", "viewer"), ("olga", "operator"), ("ada", "admin")]
)
def test_roles_in_the_dashboard_and_the_api(
    sso: tuple[Api, str], browser: Any, user: str, role: str
) -> None:
    api, proxy = sso
    context = browser.new_context(http_credentials={"username": user, "password": USERS[user][0]})
    try:
        page = context.new_page()
        page.goto(f"{proxy}/#/worker/{WORKER}")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
        expect(page.locator("#registered")).to_contain_text("demo.app.add")
        shown = "read-only" if role == "viewer" else role
        expect(page.locator("#who")).to_have_text(f"{user}@example.com · {shown}")
        grow = f"/api/worker/pool/grow/{WORKER}?n=1"
        if role == "viewer":
            expect(page.locator("#pool-grow")).to_have_count(0)
            assert _post(page, grow) == 403
        else:
            page.locator("#pool-grow").click()
            page.locator("#confirm-ok").click()
            expect(page.locator(".toast-ok")).to_contain_text("grow", ignore_case=True)
            assert _post(page, f"/api/worker/pool/shrink/{WORKER}?n=1") == 200
        if role == "admin":
            expect(page.locator("#shutdown")).to_be_visible()
            assert _post(page, f"/api/worker/shutdown/{GHOST}") == 200
        else:
            expect(page.locator("#shutdown")).to_have_count(0)
            assert _post(page, f"/api/worker/shutdown/{GHOST}") == 403
        # the audit names the person and the role they acted with
        grows = _audit(api, "worker.pool_grow")
        assert grows and grows[0]["who"] == f"sso:{user}@example.com", grows[0]
        assert grows[0]["role"] == role and grows[0]["status"] == (403 if role == "viewer" else 200)
    finally:
        context.close()


def test_identity_headers_count_only_from_the_proxy(stack: Stack, tmp_path: Path) -> None:
    """The same headers sent straight to an API that trusts another address: not signed in."""
    elsewhere = {**_sso_env(), "POLLEN_AUTH_PROXY_ADDRESSES": "10.255.255.1"}
    api = Api(stack.env, tmp_path / "api.log", **elsewhere)
    try:
        claim = {"X-Forwarded-Email": "ada@example.com", "X-Forwarded-Groups": "sre"}
        assert call(api, "GET", "/api/workers", claim)[0] == 401
        assert call(api, "POST", f"/api/worker/shutdown/{GHOST}", claim)[0] == 401
    finally:
        api.stop()


def test_users_without_a_role_can_be_refused(stack: Stack, tmp_path: Path) -> None:
    env = {**_sso_env(), "POLLEN_AUTH_PROXY_DEFAULT_ROLE": "none"}
    api = Api(stack.env, tmp_path / "api.log", **env)
    try:
        status, _, body = call(api, "GET", "/api/workers", {"X-Forwarded-Email": "eve@x.org"})
        assert status == 403 and "POLLEN_ROLES" in json.loads(body)["error"]
        member = {"X-Forwarded-Email": "olga@example.com", "X-Forwarded-Groups": "ops"}
        assert call(api, "GET", "/api/workers", member)[0] == 200
    finally:
        api.stop()


@pytest.mark.parametrize(
    "env",
    [
        {"POLLEN_AUTH_PROXY_USER_HEADER": "X-Forwarded-Email"},  # trusts nobody: an error
        {**_sso_env(), "POLLEN_ROLES": "boss=alice"},
        {**_sso_env(), "POLLEN_AUTH_PROXY_ADDRESSES": "not-an-address"},
        {**_sso_env(), "POLLEN_AUTH_PROXY_DEFAULT_ROLE": "root"},
    ],
)
def test_bad_sso_settings_stop_the_api(env: dict[str, str]) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "services.api"],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "POLLEN_" in done.stderr, done.stderr
