"""A real attacker: a page on another origin, opened in Debian's Chromium, tries to run a
task (a no-cors ``fetch`` with a JSON text body, and a ``<form enctype=text/plain>``), to grow
a worker's pool, and to read the event stream over a WebSocket, against the open API and
against basic auth with the user signed in. Nothing may happen. The same requests from the
API's own origin (the dashboard's) and from a script still work, so each refusal is the
cross-site check and not a broken request."""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import urllib.request
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from tests.security.conftest import PASSWORD, USER, WORKER, Stack, basic
from tests.support.api import Api
from tests.support.servers import free_port, wait_for

ATTACK_PAGE = """<!doctype html>
<html><body>
<iframe name="sink" style="display:none"></iframe>
<form id="form" target="sink" method="POST" enctype="text/plain">
  <input name='{"args": [__FORM__, 1], "pad": "' value='"}'>
</form>
<form id="grow" target="sink" method="POST"></form>
<script>
window.attack = async (api, worker) => {
  const out = {fetch: null, form: null, grow: null, ws: {messages: 0, opened: false}};
  try {
    await fetch(api + "/api/task/send-task/demo.app.add", {
      method: "POST", mode: "no-cors", credentials: "include",
      body: JSON.stringify({args: [__FETCH__, 1]}),
    });
    out.fetch = "sent";
  } catch (e) { out.fetch = "error: " + e; }
  const form = document.getElementById("form");
  form.action = api + "/api/task/send-task/demo.app.add";
  form.submit();
  out.form = "submitted";
  const grow = document.getElementById("grow");
  grow.action = api + "/api/worker/pool/grow/" + encodeURIComponent(worker) + "?n=1";
  grow.submit();
  out.grow = "submitted";
  await new Promise((resolve) => {
    const ws = new WebSocket(api.replace(/^http/, "ws") + "/api/events?since=0-0");
    ws.onopen = () => { out.ws.opened = true; };
    ws.onmessage = () => { out.ws.messages += 1; };
    ws.onclose = (e) => { out.ws.code = e.code; resolve(); };
    setTimeout(() => { ws.close(); resolve(); }, 3000);
  });
  return out;
};
</script>
</body></html>
"""


_CONTROLS = itertools.count(1)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def attacker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A static web server on another port: the attacker's site."""
    root = tmp_path_factory.mktemp("attacker")
    (root / "attack.html").write_text(
        ATTACK_PAGE.replace("__FORM__", "4343").replace("__FETCH__", "4242")
    )
    port = free_port()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), partial(_Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    server.server_close()


def _args(task: dict[str, Any]) -> str:
    return str(task.get("args"))


def _ran(stack: Stack, first: int, second: int = 1) -> list[dict[str, Any]]:
    """The ``demo.app.add(first, second)`` tasks Pollen saw."""
    return [t for t in stack.tasks_named("demo.app.add") if _args(t) == f"[{first}, {second}]"]


def _control_calls(stack: Stack) -> list[str]:
    return [f"{e['action']} {e['status']}" for e in stack.audit()]


@pytest.mark.parametrize("site", ["localhost", "127.0.0.1"], ids=["cross-site", "same-site"])
@pytest.mark.parametrize("mode", ["open", "basic"])
def test_page_on_another_origin_cannot_drive_the_api(
    stack: Stack, attacker: int, browser: Any, site: str, mode: str
) -> None:
    api: Api = stack.open_api if mode == "open" else stack.basic_api
    credentials = {"username": USER, "password": PASSWORD} if mode == "basic" else None
    context = browser.new_context(http_credentials=credentials)
    try:
        page = context.new_page()
        if credentials:
            # the user is signed in to Pollen in this browser
            page.goto(f"{api.url}/")
            page.wait_for_selector("#workers, main, body")
        audited_before = len(_control_calls(stack))
        control = next(_CONTROLS)  # this run's own same-origin task: add(5151, control)
        page.goto(f"http://{site}:{attacker}/attack.html")
        out = page.evaluate("([api, worker]) => attack(api, worker)", [api.url, WORKER])
        assert out["fetch"] == "sent" and out["form"] == "submitted", out
        assert out["ws"]["messages"] == 0 and not out["ws"]["opened"], out

        # the same request from the API's own origin works (the dashboard's way)
        page.goto(f"{api.url}/")
        status = page.evaluate(
            """async ([api, control]) => (await fetch(api + "/api/task/send-task/demo.app.add", {
                   method: "POST", headers: {"Content-Type": "application/json"},
                   body: JSON.stringify({args: [5151, control]})})).status""",
            [api.url, control],
        )
        assert status == 200
        # it was sent after the attack's requests, to the same queue: once it is done in
        # Pollen, a task the attack had sent would be there too
        wait_for(
            lambda: any(t.get("state") == "SUCCESS" for t in _ran(stack, 5151, control)),
            timeout=60,
            message="the same-origin task ran",
        )
        assert _ran(stack, 4242) == [] and _ran(stack, 4343) == []
        calls = _control_calls(stack)
        # newest first: only the same-origin call was audited, no refused one reached control
        assert calls[: len(calls) - audited_before] == ["task.send_task 200"], calls
    finally:
        context.close()


def test_script_clients_are_unchanged(stack: Stack) -> None:
    """curl and Flower API clients send no Origin or Sec-Fetch-Site: they pass as before."""
    request = urllib.request.Request(
        f"{stack.basic_api.url}/api/task/send-task/demo.app.add",
        data=json.dumps({"args": [6161, 1]}).encode(),
        headers=basic(USER, PASSWORD),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    wait_for(lambda: _ran(stack, 6161), timeout=60, message="the script's task ran")


def test_dashboard_prompt_works_with_tokens_and_basic_together(stack: Stack, browser: Any) -> None:
    """Both schemes configured: one WWW-Authenticate header per scheme, so Chromium answers the
    Basic challenge with the user's credentials and the dashboard loads its data."""
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    try:
        page = context.new_page()
        page.goto(f"{stack.both_api.url}/")
        who = page.evaluate("async () => (await (await fetch('/api/whoami')).json())")
        assert who["name"] == f"user:{USER}" and who["can_control"], who
    finally:
        context.close()
