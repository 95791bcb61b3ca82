"""Alert rules and alerts (``shared/alerts.py``): rules are read by anyone who may read the
API and written by admins (``PUT``/``DELETE``, each recorded in the audit); the active
enabler evaluates them and delivers (``services/enabler/alerts.py``).

- ``GET /api/alerts/rules``: the rules, and the receivers they may name (name and kind: their
  URLs stay in ``POLLEN_ALERT_RECEIVERS``).
- ``PUT /api/alerts/rules/{name}``: add or replace a rule (a JSON ``Rule``).
- ``DELETE /api/alerts/rules/{name}``: remove one (its firing alerts resolve).
- ``GET /api/alerts``: the alerts pending and firing now.
- ``GET /api/alerts/history``: firings, resolutions and delivery attempts, newest first.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web
from multidict import MultiDict

from services.api import params
from services.api.context import ctx
from services.api.control.audit import BODY_KEY, Body, audited
from services.api.control.resource import Control
from services.api.errors import bad_param, not_found
from services.api.openapi import CONTROL_ERRORS, INTEGER, Spec, json_body, operation, param
from shared.alerts import KINDS, NAME_RE, Rule, parse_receivers

_encode = msgspec.json.encode
_decode = msgspec.json.decode
_decode_rule = msgspec.json.Decoder(Rule).decode
JSON = "application/json"
HISTORY_MOST = 1000
_routes = web.RouteTableDef()


def _json(body: Any) -> web.Response:
    return web.Response(body=_encode(body), content_type=JSON)


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not NAME_RE.match(name):
        raise bad_param("name", "1-64 letters, digits, '_', '.' or '-'")
    return name


@_routes.get("/api/alerts/rules")
async def list_rules(request: web.Request) -> web.Response:
    c = ctx(request)
    raw = await c.redis.hgetall(c.keys.alert_rules)
    receivers = parse_receivers(c.settings.alert_receivers)
    rules: dict[str, Any] = {}
    for k, v in sorted(raw.items()):
        try:
            rules[k.decode()] = msgspec.to_builtins(_decode_rule(v))
        except msgspec.MsgspecError as exc:  # written past the API: shown, not fatal
            rules[k.decode()] = {"invalid": str(exc)}
    return _json(
        {
            "rules": rules,
            "receivers": [{"name": r.name, "kind": r.kind} for r in receivers.values()],
            "kinds": list(KINDS),
        }
    )


@_routes.put("/api/alerts/rules/{name}")
@audited("alerts.rule_put", "name", role="admin")
async def put_rule(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = _name(request)
    raw = await request.read()
    try:
        rule = _decode_rule(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise bad_param("body", str(exc)) from None
    request[BODY_KEY] = msgspec.to_builtins(rule)
    most = ctl.settings.chart_retention_days * 86400
    if rule.window > most:
        # the per-minute counters the windowed kinds read are kept that long
        raise bad_param("window", f"at most {most} s (POLLEN_CHART_RETENTION_DAYS)")
    known = parse_receivers(ctl.settings.alert_receivers)
    unknown = [r for r in rule.receivers if r not in known]
    if unknown:
        raise bad_param("receivers", f"not in POLLEN_ALERT_RECEIVERS: {', '.join(unknown)}")
    await ctl.redis.hset(ctl.keys.alert_rules, name, _encode(rule))
    return {"name": name, "rule": msgspec.to_builtins(rule)}


@_routes.delete("/api/alerts/rules/{name}")
@audited("alerts.rule_delete", "name", role="admin")
async def delete_rule(request: web.Request, ctl: Control, args: MultiDict[str]) -> Body:
    name = _name(request)
    if not await ctl.redis.hdel(ctl.keys.alert_rules, name):
        raise not_found(f"no alert rule {name!r}")
    return {"message": f"Deleted alert rule '{name}'"}


@_routes.get("/api/alerts")
async def list_alerts(request: web.Request) -> web.Response:
    c = ctx(request)
    raw = await c.redis.hgetall(c.keys.alert_state)
    alerts = [_decode(v) for _, v in sorted(raw.items())]
    return _json({"alerts": alerts})


@_routes.get("/api/alerts/history")
async def history(request: web.Request) -> web.Response:
    c = ctx(request)
    limit = params.integer(request.query, "limit", 100, minimum=1, maximum=HISTORY_MOST)
    assert limit is not None
    rows = await c.redis.xrevrange(c.keys.alert_log, count=limit)
    return _json({"entries": [{"id": i.decode(), **_decode(f[b"e"])} for i, f in rows]})


routes = list(_routes)
_NAME = param("name", "the rule's name (1-64 letters, digits, '_', '.' or '-')", where="path")
openapi_paths: Spec = {
    "/api/alerts/rules": operation(
        "get",
        "Alert rules, the receivers they may name and the kinds of rule (Pollen)",
        [],
        json_body("rules ({name: rule}), receivers ([{name, kind}]), kinds"),
    ),
    "/api/alerts/rules/{name}": {
        **operation(
            "put",
            "Add or replace an alert rule (admins; Pollen)",
            [_NAME],
            json_body("name, rule"),
            CONTROL_ERRORS,
            requestBody={
                "required": True,
                "content": {JSON: {"schema": msgspec.json.schema(Rule)}},
            },
        ),
        **operation(
            "delete",
            "Remove an alert rule (admins; Pollen); its firing alerts resolve",
            [_NAME],
            json_body("message"),
            CONTROL_ERRORS,
        ),
    },
    "/api/alerts": operation(
        "get",
        "Alerts pending and firing now (Pollen)",
        [],
        json_body(
            "alerts: [{rule, subject, kind, severity, receivers, description, state "
            "(pending or firing), value, since, fired_at, sent_at}]"
        ),
    ),
    "/api/alerts/history": operation(
        "get",
        "Alert firings, resolutions and delivery attempts, newest first (Pollen)",
        [param("limit", f"entries (default 100, at most {HISTORY_MOST})", INTEGER)],
        json_body(
            "entries: [{id, time, event (firing, resolved or delivery), rule, subject, kind, "
            "severity, value; a delivery's status, receiver, attempt, ok, http_status, error}]"
        ),
    ),
}
