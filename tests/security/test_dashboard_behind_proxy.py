"""The dashboard keeps working under every auth mode (open, tokens, basic, both) behind the
compose nginx (deploy/nginx.conf, Debian's nginx): it loads its data, its live WebSocket
connects through the proxy (the cross-site check sees the browser's own origin), and a control
action from the page (same origin) is answered."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.security.conftest import PASSWORD, TOKEN, USER, WORKER, Stack, basic
from tests.support.api import Api
from tests.support.servers import start_proxy


def _shrink(api: Api, headers: dict[str, str]) -> None:
    """Undo the page's pool grow, as a script (no browser headers)."""
    request = urllib.request.Request(
        f"{api.url}/api/worker/pool/shrink/{WORKER}?n=1", data=b"", headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=15) as resp:
        assert json.loads(resp.read())["message"]


@pytest.mark.parametrize("mode", ["open", "tokens", "basic", "both"])
def test_dashboard_behind_nginx(stack: Stack, browser: Any, mode: str) -> None:
    token_api: Api | None = None
    if mode == "open":
        api, script_auth = stack.open_api, {}
    elif mode == "tokens":
        token_api = Api(stack.env, stack.workdir / "api-tokens.log", POLLEN_API_TOKENS=TOKEN)
        api, script_auth = token_api, {"Authorization": f"Bearer {TOKEN}"}
    elif mode == "basic":
        api, script_auth = stack.basic_api, basic(USER, PASSWORD)
    else:
        api, script_auth = stack.both_api, basic(USER, PASSWORD)
    proxy = start_proxy(api.port, stack.workdir / f"nginx-{mode}")
    credentials = {"username": USER, "password": PASSWORD} if mode in ("basic", "both") else None
    context = browser.new_context(http_credentials=credentials)
    try:
        page = context.new_page()
        page.goto(f"{proxy.url}/#/worker/{WORKER}")
        if mode == "tokens":
            expect(page.locator("#signin")).to_be_visible()
            page.locator("#signin-token").fill(TOKEN)
            page.locator("#signin button[value=ok]").click()
        # the live WebSocket through nginx, then the worker's data
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
        expect(page.locator("#registered")).to_contain_text("demo.app.add")
        page.locator("#pool-grow").click()
        page.locator("#confirm-ok").click()
        expect(page.locator(".toast-ok")).to_contain_text("grow", ignore_case=True)
        _shrink(api, script_auth)
    finally:
        context.close()
        proxy.stop()
        if token_api is not None:
            token_api.stop()
