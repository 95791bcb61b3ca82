"""Alert rules end to end: rules written through the API, evaluated by the real enabler over
what a real collector keeps from real workers, delivered to a local HTTP receiver (JSON and
Slack-style webhooks; it fails its first request, so the retry shows) and to Debian's real
``prometheus-alertmanager``, which then calls the receiver itself."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from shared.alerts import Rule, parse_receivers
from shared.settings import SettingsError, load
from tests.support.api import Api
from tests.support.servers import (
    Process,
    RedisServer,
    celery_worker,
    free_port,
    pollen_env,
    service,
    wait_for,
)

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
STEADY, CHURNED = "steady@pollen-test", "churned@pollen-test"


class Receiver:
    """A local HTTP endpoint keeping every POST (path, JSON body); the first POST to each path
    is answered 500."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        seen: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                first = self.path not in seen
                seen.add(self.path)
                with owner.lock:
                    owner.posts.append((self.path, json.loads(body or b"null")))
                self.send_response(500 if first else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[Any]:
        with self.lock:
            return [b for p, b in self.posts if p == path]

    def stop(self) -> None:
        self.server.shutdown()


class Alertmanager:
    def __init__(self, workdir: Path, webhook: str) -> None:
        if not shutil.which(ALERTMANAGER):
            pytest.fail(f"{ALERTMANAGER} is missing: run .ci/services (prometheus-alertmanager)")
        self.port = free_port()
        config = workdir / "alertmanager.yml"
        config.write_text(
            json.dumps(
                {
                    "route": {
                        "receiver": "hook",
                        "group_by": ["alertname"],
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook}]}],
                }
            )
        )
        self.process = Process(
            [
                ALERTMANAGER,
                f"--config.file={config}",
                f"--storage.path={workdir / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            workdir / "alertmanager.log",
            {},
            cwd=workdir,
        )
        wait_for(lambda: self.alerts() is not None, timeout=30, message="alertmanager up")

    def alerts(self) -> list[dict[str, Any]] | None:
        url = f"http://127.0.0.1:{self.port}/api/v2/alerts?active=true&silenced=false"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                found: list[dict[str, Any]] = json.loads(resp.read())
                return found
        except OSError:
            return None


def call(api: Api, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


class Stack:
    def __init__(self, **parts: Any) -> None:
        self.__dict__.update(parts)
        self.api: Api
        self.hook: Receiver
        self.am: Alertmanager
        self.broker: str
        self.workdir: Path
        self.churned: Process


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("alerts")
    server = RedisServer(workdir / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    hook = Receiver()
    base = f"http://127.0.0.1:{hook.port}"
    am = Alertmanager(workdir, f"{base}/from-alertmanager")
    receivers = f"hook=webhook:{base}/hook,chat=slack:{base}/slack,am=alertmanager:http://127.0.0.1:{am.port}"
    env = pollen_env(
        broker,
        f"redis://127.0.0.1:{server.port}/1",
        "al",
        alert_interval="0.5",
        alert_receivers=receivers,
        api_tokens="admin-secret,ro-secret:ro",
    )
    procs: list[Process] = []
    apis: list[Api] = []
    try:
        procs.append(service("collector", env, workdir / "collector.log"))
        procs.append(service("enabler", env, workdir / "enabler.log"))
        procs.append(celery_worker(broker, workdir / "steady.log", STEADY))
        churned = celery_worker(broker, workdir / "churned.log", CHURNED)
        procs.append(churned)
        # one API open on loopback (admin), one with tokens (a viewer's among them)
        api = Api({k: v for k, v in env.items() if k != "POLLEN_API_TOKENS"}, workdir / "api.log")
        apis.append(api)
        tokened = Api(env, workdir / "api-tokens.log")
        apis.append(tokened)

        def both_up() -> bool:
            workers = api.data("/api/workers")
            return STEADY in workers and CHURNED in workers

        wait_for(both_up, timeout=60, message="both workers up")
        yield Stack(
            state=redis.Redis(port=server.port, db=1),
            api=api,
            tokened=tokened,
            hook=hook,
            am=am,
            broker=broker,
            workdir=workdir,
            churned=churned,
        )
    finally:
        for a in apis:
            a.stop()
        for p in procs:
            p.stop()
        am.process.stop()
        hook.stop()
        server.stop()


def test_receivers_setting() -> None:
    got = parse_receivers(
        "a=webhook:http://x/y,b=slack:https://hooks/z,c=alertmanager:http://am:9093"
    )
    assert [(r.name, r.kind) for r in got.values()] == [
        ("a", "webhook"),
        ("b", "slack"),
        ("c", "alertmanager"),
    ]
    for bad in ("a=email:http://x", "a=webhook:ftp://x", "a webhook", "=webhook:http://x"):
        with pytest.raises(SettingsError, match="POLLEN_ALERT_RECEIVERS") as caught:
            load({"POLLEN_ALERT_RECEIVERS": bad})
        assert "http://x" not in str(caught.value)  # a URL may hold a token: never shown


def test_rules_are_validated_and_admin_only(stack: Stack) -> None:
    rule = {"kind": "failure_count", "match": "demo.app.*", "threshold": 2, "receivers": ["hook"]}
    assert call(stack.api, "PUT", "/api/alerts/rules/x", {**rule, "kind": "nope"})[0] == 400
    status, body = call(stack.api, "PUT", "/api/alerts/rules/x", {**rule, "receivers": ["nobody"]})
    assert status == 400 and "nobody" in body["error"]
    assert call(stack.api, "PUT", "/api/alerts/rules/x", {**rule, "window": 5})[0] == 400
    # longer than the per-minute counters are kept (POLLEN_CHART_RETENTION_DAYS, 2 days)
    status, body = call(stack.api, "PUT", "/api/alerts/rules/x", {**rule, "window": 3 * 86400})
    assert status == 400 and "POLLEN_CHART_RETENTION_DAYS" in body["error"]
    assert call(stack.api, "PUT", "/api/alerts/rules/bad%20name", rule)[0] in (400, 404)
    tok = stack.tokened  # type: ignore[attr-defined]
    assert call(tok, "PUT", "/api/alerts/rules/x", rule, "ro-secret")[0] == 403
    assert call(tok, "GET", "/api/alerts/rules", None, "ro-secret")[0] == 200
    assert call(stack.api, "DELETE", "/api/alerts/rules/never-made")[0] == 404
    status, body = call(stack.api, "GET", "/api/alerts/rules")
    # receivers are listed by name and kind; their URLs are not
    assert {r["name"]: r["kind"] for r in body["receivers"]} == {
        "hook": "webhook",
        "chat": "slack",
        "am": "alertmanager",
    }
    assert "127.0.0.1" not in json.dumps(body)


def test_a_broken_rule_stops_nothing(stack: Stack) -> None:
    """A rule written into Redis by hand, not JSON: shown as invalid, skipped by the enabler,
    while the other rules are evaluated (the next tests fire theirs)."""
    state: redis.Redis = stack.state  # type: ignore[attr-defined]
    state.hset("al:alerts:rules", "broken", b"{not json")
    _, body = call(stack.api, "GET", "/api/alerts/rules")
    assert "invalid" in body["rules"]["broken"]


def firing(stack: Stack, rule: str) -> dict[str, dict[str, Any]]:
    _, body = call(stack.api, "GET", "/api/alerts")
    return {a["subject"]: a for a in body["alerts"] if a["rule"] == rule and a["state"] == "firing"}


def test_failures_fire_and_are_delivered_everywhere(stack: Stack) -> None:
    rule = {
        "kind": "failure_count",
        "match": "demo.app.fail",
        "threshold": 3,
        "window": 300,
        "severity": "critical",
        "receivers": ["hook", "chat", "am"],
        "description": "demo failures",
    }
    status, body = call(stack.api, "PUT", "/api/alerts/rules/fails", rule)
    assert status == 200, body
    app = Celery(broker=stack.broker)
    try:
        for i in range(2):
            app.send_task("demo.app.fail", (f"a{i}",))
        wait_for(
            lambda: sum(1 for t in stack.api.data("/api/tasks?state=FAILURE").values()) >= 2,
            timeout=30,
            message="two failures",
        )
        assert firing(stack, "fails") == {}  # 2 < 3: not yet
        app.send_task("demo.app.fail", ("a2",))
    finally:
        app.close()
    alert = wait_for(
        lambda: firing(stack, "fails").get("demo.app.fail"), timeout=30, message="firing"
    )
    assert isinstance(alert, dict) and alert["value"] >= 3 and alert["severity"] == "critical"
    # the JSON webhook: its first try failed (500), the retry delivered it
    hooked = wait_for(lambda: stack.hook.bodies("/hook"), timeout=15, message="webhook posts")
    assert isinstance(hooked, list)
    wait_for(lambda: len(stack.hook.bodies("/hook")) >= 2, timeout=15, message="the retry")
    first = stack.hook.bodies("/hook")[0]
    assert (first["status"], first["rule"], first["task"], first["source"]) == (
        "firing",
        "fails",
        "demo.app.fail",
        "pollen",
    )
    # Slack-compatible text
    wait_for(lambda: len(stack.hook.bodies("/slack")) >= 2, timeout=15, message="slack posts")
    assert "[FIRING] fails: task demo.app.fail" in stack.hook.bodies("/slack")[-1]["text"]
    # the real Alertmanager has it, with our labels, and sends it on to its own receiver
    am_alert = wait_for(
        lambda: next(
            (a for a in stack.am.alerts() or [] if a["labels"].get("alertname") == "fails"), None
        ),
        timeout=30,
        message="the alert in Alertmanager",
    )
    assert isinstance(am_alert, dict)
    assert am_alert["labels"]["task"] == "demo.app.fail"
    assert am_alert["labels"]["severity"] == "critical"
    routed = wait_for(
        lambda: stack.hook.bodies("/from-alertmanager")[1:],  # its first POST got the 500
        timeout=30,
        message="Alertmanager's own webhook",
    )
    assert isinstance(routed, list) and routed[0]["alerts"][0]["labels"]["alertname"] == "fails"
    # every firing and attempt is in the history
    _, history = call(stack.api, "GET", "/api/alerts/history?limit=1000")
    mine = [e for e in history["entries"] if e["rule"] == "fails"]
    assert [e["event"] for e in mine].count("firing") == 1
    attempts = sorted(
        (e["attempt"], e["ok"], e.get("http_status"))
        for e in mine
        if e["event"] == "delivery" and e["receiver"] == "hook"
    )
    assert attempts[:2] == [(1, False, 500), (2, True, 200)]

    # removing the rule resolves its alert, and says so to the receivers
    assert call(stack.api, "DELETE", "/api/alerts/rules/fails")[0] == 200
    wait_for(
        lambda: any(b["status"] == "resolved" for b in stack.hook.bodies("/hook")),
        timeout=15,
        message="the resolution delivered",
    )
    assert firing(stack, "fails") == {}
    _, audit = call(stack.api, "GET", "/api/audit")
    actions = [e["action"] for e in audit["entries"]]
    assert "alerts.rule_put" in actions and "alerts.rule_delete" in actions


def test_worker_down_fires_after_its_for_and_resolves(stack: Stack) -> None:
    rule = {"kind": "worker_down", "match": "churned@*", "for_seconds": 2, "receivers": ["hook"]}
    assert call(stack.api, "PUT", "/api/alerts/rules/down", rule)[0] == 200
    before = len(stack.hook.bodies("/hook"))
    stack.churned.stop()  # a warm shutdown: worker-offline
    pending = wait_for(
        lambda: any(
            a["rule"] == "down" and a["state"] == "pending"
            for a in call(stack.api, "GET", "/api/alerts")[1]["alerts"]
        ),
        timeout=20,
        message="pending first",
    )
    assert pending
    alert = wait_for(lambda: firing(stack, "down").get(CHURNED), timeout=20, message="firing")
    assert isinstance(alert, dict) and alert["fired_at"] - alert["since"] >= 2
    again = celery_worker(stack.broker, stack.workdir / "churned-again.log", CHURNED)
    try:
        wait_for(lambda: firing(stack, "down") == {}, timeout=60, message="resolved")
        wait_for(
            lambda: (
                [b["status"] for b in stack.hook.bodies("/hook")[before:] if b["rule"] == "down"][
                    -1:
                ]
                == ["resolved"]
            ),
            timeout=20,
            message="the resolution delivered",
        )
    finally:
        again.stop()
    assert call(stack.api, "DELETE", "/api/alerts/rules/down")[0] == 200


def test_rule_schema_is_the_openapi_body(stack: Stack) -> None:
    _, spec = call(stack.api, "GET", "/api/openapi.json")
    put = spec["paths"]["/api/alerts/rules/{name}"]["put"]
    assert "kind" in json.dumps(put["requestBody"])
    assert Rule(kind="runtime").window == 300
