"""``/api/openapi.json``: the OpenAPI 3.1 description of every endpoint, written as data.

The one convention: every route module exports ``routes`` and ``openapi_paths`` (its paths,
built with the helpers here) side by side, and the app factory passes them all to ``build``;
a test checks that every route the app registers is described.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

Spec = dict[str, Any]


def param(name: str, description: str, schema: Spec | None = None, where: str = "query") -> Spec:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema or {"type": "string"},
    }


def json_body(description: str, schema: Spec | None = None) -> Spec:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
#: Responses every read endpoint may give (others add theirs, e.g. 403 for control).
ERRORS = {
    "400": json_body("a bad parameter; the message names it", ERROR),
    "401": json_body("credentials missing or wrong", ERROR),
    "503": json_body("Redis (the state store) is unavailable", ERROR),
}
BOOL = {"type": "string", "description": "y/yes/t/true/on/1 or n/no/f/false/off/0"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
#: What the control endpoints may answer besides ``ERRORS``.
CONTROL_ERRORS = {
    **ERRORS,
    "403": json_body("read-only API or credential, or the worker refused (reason given)", ERROR),
    "503": json_body("broker, result backend or Redis unavailable", ERROR),
}


def operation(
    method: str,
    summary: str,
    parameters: list[Spec],
    ok: Spec | None,
    errors: Spec | None = None,
    **extra: Any,
) -> Spec:
    """One path item with one operation: its 200 answer (None: it has none, e.g. a redirect)
    and ``ERRORS`` (or ``errors``); ``extra``: more of the operation's fields."""
    responses = {**({} if ok is None else {"200": ok}), **(ERRORS if errors is None else errors)}
    return {method: {"summary": summary, "parameters": parameters, "responses": responses, **extra}}


#: This document's own path.
openapi_paths: Spec = {
    "/api/openapi.json": operation("get", "This document", [], json_body("OpenAPI 3.1"), {})
}


def build(paths: Spec, prefix: str = "") -> Spec:
    """The document of ``paths`` (every route module's ``openapi_paths``); with a ``prefix``
    (POLLEN_URL_PREFIX) its paths are relative to a server at that path, as OpenAPI has them."""
    servers = {"servers": [{"url": prefix}]} if prefix else {}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Pollen API",
            "version": "0.1.0",
            "description": "Flower-compatible Celery monitoring API over Redis.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            }
        },
        "security": [{"bearer": []}, {"basic": []}, {}],
        **servers,
        "paths": {**paths, **openapi_paths},
    }


def handler(spec: Spec) -> web.RouteDef:
    body = msgspec.json.encode(spec)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return web.get("/api/openapi.json", openapi_json, name="openapi")
