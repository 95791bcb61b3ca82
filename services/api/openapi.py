"""``/api/openapi.json``: the OpenAPI 3.1 description of every endpoint, written as data.

Other route modules (the control endpoints) add their paths through ``build(extra_paths)``;
a test checks that every route the app registers is described here.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from shared.events import TASK_FIELDS

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
TASK = {
    "type": "object",
    "description": "celery's Task.as_dict() with worker as the hostname",
    "properties": {name: {} for name in TASK_FIELDS},
}
_BOOL = {"type": "string", "description": "y/yes/t/true/on/1 or n/no/f/false/off/0"}
_TIME = {
    "type": "string",
    "description": "'YYYY-MM-DD HH:MM' in the server's local time (as Flower), or unix seconds",
}
_TASK_HEADERS = {
    "X-Pollen-Examined": {
        "description": "index entries examined by filters and search",
        "schema": {"type": "integer"},
    },
    "X-Pollen-Scan-Capped": {
        "description": "true when the scan stopped at POLLEN_SEARCH_SCAN_LIMIT (page may be short)",
        "schema": {"type": "string"},
    },
    "X-Pollen-Page-Capped": {
        "description": "present when the page size was capped at POLLEN_MAX_PAGE (its value)",
        "schema": {"type": "integer"},
    },
    "X-Pollen-Next-Cursor": {
        "description": "pass as cursor= for the next page (present when the page is full)",
        "schema": {"type": "string"},
    },
}
_WS = (
    "WebSocket. Each message is a normalized event (JSON) with stream_id (and cursor with "
    "several shards); see docs/api.md."
)
_WS_PARAMS = [
    param("type", "event type, repeatable, wildcards like task-*"),
    param("uuid", "task uuid, repeatable"),
    param("taskname", "task name, repeatable"),
    param("worker", "event hostname, repeatable"),
    param("state", "task state after the event, repeatable"),
    param("since", "resume after this cursor (stream id, or one per shard comma-joined)"),
    param(
        "batch",
        "milliseconds: one JSON array of the events of each period",
        {"type": "integer", "minimum": 1, "maximum": 10000},
    ),
    param("token", "bearer token (for clients that cannot set headers)"),
]

PATHS: Spec = {
    "/api/tasks": {
        "get": {
            "summary": "List tasks (Flower-compatible)",
            "parameters": [
                param(
                    "limit",
                    "page size (default and maximum: POLLEN_MAX_PAGE)",
                    {"type": "integer", "minimum": 0},
                ),
                param("offset", "tasks skipped", {"type": "integer", "minimum": 0}),
                param(
                    "sort_by",
                    "name, state, received or started; '-' prefix: descending",
                    {"type": "string"},
                ),
                param("workername", "worker hostname (case-insensitive; All = any)"),
                param("taskname", "task name (case-insensitive; All = any)"),
                param("state", "task state (case-insensitive; All = any)"),
                param("received_start", "received at or after (tasks never received pass)", _TIME),
                param("received_end", "received at or before (tasks never received pass)", _TIME),
                param("started_start", "started at or after (tasks never started pass)", _TIME),
                param("started_end", "started at or before (tasks never started pass)", _TIME),
                param("search", "Flower's task-filter query syntax"),
                param("cursor", "X-Pollen-Next-Cursor of the previous page"),
            ],
            "responses": {
                "200": {
                    **json_body(
                        "ordered object uuid -> task",
                        {"type": "object", "additionalProperties": TASK},
                    ),
                    "headers": _TASK_HEADERS,
                },
                **ERRORS,
            },
        }
    },
    "/api/task/info/{uuid}": {
        "get": {
            "summary": "One task (Flower-compatible)",
            "parameters": [param("uuid", "task id", where="path")],
            "responses": {
                "200": json_body("the task", TASK),
                "404": json_body("unknown task", ERROR),
                **ERRORS,
            },
        }
    },
    "/api/task/types": {
        "get": {
            "summary": "Task names seen",
            "responses": {
                "200": json_body(
                    "task names",
                    {"type": "object", "properties": {"task-types": {"type": "array"}}},
                ),
                **ERRORS,
            },
        }
    },
    "/api/workers": {
        "get": {
            "summary": "Workers: inspect data, or liveness with status=1 (Flower-compatible)",
            "parameters": [
                param("refresh", "accepted; inspect data is refreshed by the enabler", _BOOL),
                param("workername", "one worker (adds its active/reserved/scheduled/revoked)"),
                param("status", "only {hostname: alive}", _BOOL),
            ],
            "responses": {
                "200": json_body("hostname -> inspect answers (or event fields)"),
                "404": json_body("unknown worker", ERROR),
                **ERRORS,
            },
        }
    },
    "/api/queues/length": {
        "get": {
            "summary": "Queue lengths sampled by the enabler",
            "responses": {
                "200": json_body(
                    "queues",
                    {"type": "object", "properties": {"active_queues": {"type": "array"}}},
                ),
                **ERRORS,
            },
        }
    },
    "/api/events": {
        "get": {
            "summary": "Live events (WebSocket) with filters and resume",
            "description": _WS,
            "parameters": _WS_PARAMS,
            "responses": {"101": {"description": "switching to WebSocket"}, **ERRORS},
        }
    },
    "/api/task/events/{event_type}/": {
        "get": {
            "summary": "Flower 1.0 task event WebSocket (one event type)",
            "description": _WS,
            "parameters": [param("event_type", "e.g. task-succeeded", where="path")],
            "responses": {"101": {"description": "switching to WebSocket"}, **ERRORS},
        }
    },
    "/api/task/events/{event_type}/{uuid}": {
        "get": {
            "summary": "Flower 1.0 task event WebSocket (one event type, one task)",
            "description": _WS,
            "parameters": [
                param("event_type", "e.g. task-succeeded", where="path"),
                param("uuid", "task id", where="path"),
            ],
            "responses": {"101": {"description": "switching to WebSocket"}, **ERRORS},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (Flower's names plus pollen_*)",
            "responses": {"200": {"description": "text exposition format"}},
        }
    },
    "/healthz": {
        "get": {"summary": "Liveness", "responses": {"200": json_body("the process answers")}}
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: Redis answers and a collector heartbeat is fresh",
            "responses": {
                "200": json_body("ready"),
                "503": json_body("not ready, with the reason"),
            },
        }
    },
    "/healthcheck": {
        "get": {"summary": "Flower's health check", "responses": {"200": {"description": "OK"}}}
    },
    "/api/openapi.json": {
        "get": {"summary": "This document", "responses": {"200": json_body("OpenAPI 3.1")}}
    },
}


def build(extra_paths: Spec | None = None, prefix: str = "") -> Spec:
    """The document; with a ``prefix`` (POLLEN_URL_PREFIX) its paths are relative to a server
    at that path, as OpenAPI has them."""
    paths = dict(PATHS)
    paths.update(extra_paths or {})
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
        "paths": paths,
    }


def handler(spec: Spec) -> web.RouteDef:
    body = msgspec.json.encode(spec)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return web.get("/api/openapi.json", openapi_json, name="openapi")
