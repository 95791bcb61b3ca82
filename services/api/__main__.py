"""``python -m services.api`` / ``pollen-api``: serve the API on POLLEN_API_HOST:POLLEN_API_PORT."""

from __future__ import annotations

import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from services.api.app import make_app
from services.api.auth import bind_refusal
from shared.broker import app_or_exit
from shared.logs import setup_logging
from shared.settings import load_or_exit


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
    return True


class AccessLogger(AbstractAccessLogger):
    """Method, path and status, never the query string: a WebSocket's ``token`` is in it."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %s %d %.1fms",
            request.remote,
            request.method,
            request.path,
            response.status,
            time * 1000,
        )


def main() -> None:
    settings = load_or_exit("pollen-api")
    app_or_exit(settings, "pollen-api")  # a bad app stops the API at start, not at first use
    setup_logging(settings.log_level, "api")
    # aiohttp logs each malformed HTTP request at ERROR with a traceback, though it answers 400:
    # that is the client's error, and a bad client must not be able to flood the log
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
    refusal = bind_refusal(settings)
    if refusal is not None:
        print(f"pollen-api: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    logging.getLogger("pollen.api").info(
        "serving on %s:%d (namespace %r, %d shard(s))",
        settings.api_host,
        settings.api_port,
        settings.namespace,
        settings.shards,
    )
    web.run_app(
        make_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        access_log=logging.getLogger("pollen.api.access")
        if settings.log_level == "DEBUG"
        else None,
        access_log_class=AccessLogger,
        # a client that leaves cancels its request's work (a search, a result wait)
        handler_cancellation=True,
        print=None,
    )


if __name__ == "__main__":
    main()
