"""JSON error responses: every error the API returns is ``{"error": "..."}`` with a status.

Handlers raise ``ApiError`` (or a helper below); the middleware turns it, unknown routes and
Redis outages (503, fast: the client has short socket timeouts) into JSON answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import msgspec
from aiohttp import web
from multidict import CIMultiDict
from redis import exceptions as redis_errors

from shared.connections import REDIS_ERRORS

log = logging.getLogger("pollen.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answer: status, message and optional extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers: CIMultiDict[str] = CIMultiDict(headers or {})


def bad_param(name: str, problem: str) -> ApiError:
    """400 naming the parameter: ``"<name>: <problem>"``."""
    return ApiError(400, f"{name}: {problem}")


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message)


def json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode({"error": message}),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = "not found" if exc.status == 404 else exc.reason
        return json_error(
            exc.status, message, {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        )
    except REDIS_ERRORS as exc:
        log.warning("redis unavailable: %s %s: %r", request.method, request.path, exc)
        return json_error(503, f"state store unavailable: {type(exc).__name__}")
    except redis_errors.RedisError as exc:
        log.exception("redis error on %s %s", request.method, request.path)
        return json_error(500, f"state store error: {exc}")
