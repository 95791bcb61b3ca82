"""The dashboard: static files from ``services/api/dashboard/`` served at ``/`` and
``/dashboard/<file>`` by every API replica.

The files are the page's code only (plain JS modules, CSS, no third-party code, no build step)
and carry no data, so they are served without credentials, like ``/api/openapi.json``. All
data comes from the public API with the API's own auth: the page asks for a token when the
API answers 401 (basic auth is answered by the browser's own prompt), and hides control
actions when ``/api/whoami`` says the caller may not use them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from services.api.errors import not_found
from services.api.openapi import Spec, operation, param

ROOT = Path(__file__).resolve().parent / "dashboard"
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
_NAME = re.compile(r"^[a-z0-9_-]+\.(?:js|css|svg)$")
#: The page may load its own files and talk to its own origin only (CSP 3: 'self' covers the
#: same host's ws: and wss:, so no other host's WebSocket).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _files() -> dict[str, tuple[bytes, str, str]]:
    """name -> (body, content type, etag) of every file the dashboard serves."""
    out = {}
    for path in sorted(ROOT.iterdir()):
        if path.name == "index.html" or _NAME.match(path.name):
            body = path.read_bytes()
            etag = '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'
            out[path.name] = (body, _TYPES[path.suffix], etag)
    return out


FILES = _files()


def _serve(request: web.Request, name: str) -> web.Response:
    found = FILES.get(name)
    if found is None:
        raise not_found(f"no dashboard file {name!r}")
    body, content_type, etag = found
    headers = {
        hdrs.ETAG: etag,
        hdrs.CACHE_CONTROL: "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if name == "index.html":
        headers["Content-Security-Policy"] = CSP
        headers["X-Frame-Options"] = "DENY"
    if request.headers.get(hdrs.IF_NONE_MATCH) == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)


async def index(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    return _serve(request, request.match_info["name"])


# names: auth.PUBLIC_ROUTES (the page's code carries no data)
routes: list[Any] = [
    web.get("/", index, name="dashboard"),
    web.get("/dashboard/{name}", asset, name="dashboard-asset"),
]

openapi_paths: Spec = {
    "/": operation(
        "get",
        "The dashboard (HTML; its data comes from this API)",
        [],
        {"description": "the dashboard page"},
        {},
    ),
    "/dashboard/{name}": operation(
        "get",
        "The dashboard's own scripts and styles",
        [param("name", "file name, e.g. app.js", where="path")],
        {"description": "the file"},
        {
            "304": {"description": "unchanged (If-None-Match)"},
            "404": {"description": "no such file"},
        },
    ),
}
