"""Pollen under a URL prefix (``POLLEN_URL_PREFIX=/flower``, Flower's ``--url_prefix``) behind
the compose nginx (Debian's nginx running deploy/nginx.conf): every route lives under the
prefix, the dashboard's every view works there with data and its live WebSocket, and the page
URLs people pasted from Flower land on the matching view."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.dashboard.conftest import IDLE_QUEUE, WORKER, Stack
from tests.dashboard.test_dashboard import no_errors
from tests.support.api import Api
from tests.support.servers import PYTHON, ROOT, Proxy, start_proxy

PREFIX = "/flower"


@pytest.fixture(scope="module")
def prefixed(stack: Stack) -> Iterator[tuple[Api, Proxy]]:
    api = Api(stack.env, stack.workdir / "api-prefix.log", POLLEN_URL_PREFIX="flower/")
    proxy = start_proxy(api.port, stack.workdir / "nginx-prefix")
    try:
        yield api, proxy
    finally:
        proxy.stop()
        api.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_every_route_lives_under_the_prefix(prefixed: tuple[Api, Proxy]) -> None:
    api, proxy = prefixed
    for path in ("/api/workers", "/api/tasks?limit=2", "/metrics", "/healthz", "/api/whoami"):
        assert fetch(f"{proxy.url}{PREFIX}{path}")[0] == 200, path
        status, headers, body = fetch(f"{proxy.url}{path}")
        assert status == 404 and json.loads(body)["error"], path
    status, headers, _ = fetch(f"{proxy.url}{PREFIX}")
    assert status == 302 and headers["Location"] == f"{PREFIX}/"
    spec = json.loads(fetch(f"{proxy.url}{PREFIX}/api/openapi.json")[2])
    assert spec["servers"] == [{"url": PREFIX}] and "/api/tasks" in spec["paths"]
    page = fetch(f"{proxy.url}{PREFIX}/")[2].decode()
    assert 'src="dashboard/app.js"' in page  # relative: resolves under the prefix
    assert fetch(f"{proxy.url}{PREFIX}/dashboard/app.js")[0] == 200
    # the container healthcheck knows the prefix
    env = {**os.environ, **api.env}
    done = subprocess.run(
        [PYTHON, "-m", "services.healthcheck", "api"], env=env, cwd=ROOT, capture_output=True
    )
    assert done.returncode == 0, done.stderr


def test_flower_page_urls_land_on_the_view(
    page: Any, stack: Stack, prefixed: tuple[Api, Proxy]
) -> None:
    _, proxy = prefixed
    base = f"{proxy.url}{PREFIX}"
    failed = next(iter(stack.api.data("/api/tasks?state=FAILURE&limit=1")))
    page.goto(f"{base}/task/{failed}")
    expect(page.locator("#task-fields")).to_contain_text(failed)
    expect(page.locator("#traceback")).to_be_visible()
    page.goto(f"{base}/worker/{WORKER}")
    expect(page.locator("#registered")).to_contain_text("demo.app.add")
    page.goto(f"{base}/tasks")
    expect(page.locator("#tasks tbody tr[data-uuid]").first).to_be_visible()
    page.goto(f"{base}/workers")
    expect(page.locator(f'#workers tr[data-worker="{WORKER}"]')).to_be_visible()
    page.goto(f"{base}/broker")
    expect(page.locator("#chart-queues .legend")).to_contain_text(IDLE_QUEUE)
    no_errors(page)


def test_workers_json_as_flower(stack: Stack, prefixed: tuple[Api, Proxy]) -> None:
    _, proxy = prefixed
    status, headers, body = fetch(f"{proxy.url}{PREFIX}/workers?json=1")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    (worker,) = [w for w in json.loads(body)["data"] if w["hostname"] == WORKER]
    assert worker["status"] is True and worker["task-succeeded"] > 0
    for field in ("pid", "freq", "heartbeats", "clock", "active", "processed", "loadavg"):
        assert field in worker, field


def test_every_view_works_under_the_prefix(page: Any, prefixed: tuple[Api, Proxy]) -> None:
    _, proxy = prefixed
    base = f"{proxy.url}{PREFIX}/"
    page.goto(base)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
    row = page.locator(f'#workers tr[data-worker="{WORKER}"]')
    expect(row.locator("[data-status]")).to_have_attribute("data-status", "online")
    page.goto(f"{base}#/tasks")
    rows = page.locator("#tasks tbody tr[data-uuid]")
    expect(rows.first).to_be_visible()
    uuid = rows.first.get_attribute("data-uuid")
    page.goto(f"{base}#/task/{uuid}")
    expect(page.locator("#task-fields")).to_contain_text(str(uuid))
    expect(page.locator("#task-events tr").first).to_be_visible()
    page.goto(f"{base}#/feed")
    # live events through nginx's WebSocket pass-through, under the prefix
    expect(page.locator("#feed tbody tr").first).to_be_visible(timeout=15_000)
    page.goto(f"{base}#/charts?minutes=15")
    expect(page.locator("#chart-by-state .legend")).to_contain_text("SUCCESS")
    page.goto(f"{base}#/worker/{WORKER}")
    # a control action through the prefix; growing always succeeds, while shrinking is
    # refused by celery when every process is busy (the demo traffic keeps them busy)
    page.locator("#pool-grow").click()
    page.locator("#confirm-ok").click()
    expect(page.locator(".toast-ok")).to_contain_text("grow", ignore_case=True)
    no_errors(page)
