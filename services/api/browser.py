"""What the API enforces because browsers exist: one middleware, in front of every route.

A web page the user visits can send requests to the API from the user's browser (with the
user's basic-auth session, or to a loopback API that needs no credentials) but cannot read
the answers unless CORS allows it. So:

- Host: an API with no credentials answers only loopback names and addresses and the names in
  ``POLLEN_ALLOWED_HOSTS``; otherwise DNS rebinding would make an attacker's page same-origin.
- Cross-site: a mutating request (anything but GET, HEAD, OPTIONS) or a WebSocket handshake
  from a page on another origin is refused with 403, unless that origin is listed in
  ``POLLEN_CORS_ORIGINS``. The browser's ``Sec-Fetch-Site`` decides where it is sent (only
  ``same-origin`` and ``none``, typed by the user, pass); else ``Origin`` is compared with the
  request's own ``Host`` (``Origin: null`` is foreign). A client that sends neither (curl,
  scripts, Flower API clients) is not a browser and passes.
- CORS for the listed origins (``*``: any origin may read, without credentials; ``*`` never
  lets a page control or open the WebSocket).
- ``X-Content-Type-Options: nosniff`` on every answer, so no answer is run as a script.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from services.api.errors import Handler, json_error
from services.api.tasks import H_EXAMINED, H_NEXT_CURSOR, H_PAGE_CAPPED, H_SCAN_CAPPED
from shared.settings import Settings, parse_basic_auth, parse_tokens

SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
_EXPOSED = ", ".join([H_EXAMINED, H_SCAN_CAPPED, H_PAGE_CAPPED, H_NEXT_CURSOR])


def _items(text: str) -> frozenset[str]:
    return frozenset(o.strip().rstrip("/") for o in text.split(",") if o.strip())


def host_name(host: str) -> str:
    """``Host`` without its port, brackets of an IPv6 address kept off, lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True  # RFC 6761: always the loopback interface
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_refusal(host: str | None, allowed: frozenset[str]) -> str | None:
    """Why an API with no credentials must not answer a request for ``host`` (None: fine)."""
    if "*" in allowed:
        return None
    name = host_name(host or "")
    if is_loopback_name(name) or name in allowed:
        return None
    return (
        f"host {name!r} not allowed: an API without credentials answers loopback names only"
        " (add the name to POLLEN_ALLOWED_HOSTS, or configure credentials)"
    )


def _netloc(origin: str) -> str | None:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        return None
    return parts.netloc.lower()


def cross_site_refusal(
    method: str,
    websocket: bool,
    origin: str | None,
    fetch_site: str | None,
    host: str | None,
    allowed: frozenset[str],
) -> str | None:
    """Why a request must be refused as cross-site (None: fine)."""
    if method in SAFE_METHODS and not websocket:
        return None
    if origin is not None and origin.rstrip("/") in allowed:
        return None
    what = "WebSocket" if websocket else method
    if fetch_site is not None:
        if fetch_site.lower() in ("same-origin", "none"):
            return None
        return f"cross-site {what} refused (Sec-Fetch-Site: {fetch_site})"
    if origin is None:
        return None  # not sent by a browser page
    netloc = _netloc(origin)
    if netloc is not None and host is not None and netloc == host.strip().lower():
        return None
    return f"cross-site {what} refused (Origin {origin!r} is not this API's origin)"


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def browser_middleware(settings: Settings) -> Middleware:
    allowed_origins = _items(settings.cors_origins)
    control_origins = allowed_origins - {"*"}
    allowed_hosts = _items(settings.allowed_hosts)
    open_api = not (
        parse_tokens(settings.api_tokens)
        or parse_basic_auth(settings.basic_auth)
        or settings.auth_proxy_user_header
    )

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        refusal = host_refusal(request.headers.get(hdrs.HOST), allowed_hosts) if open_api else None
        if refusal is None:
            refusal = cross_site_refusal(
                request.method,
                _is_websocket(request),
                origin,
                request.headers.get("Sec-Fetch-Site"),
                request.headers.get(hdrs.HOST),
                control_origins,
            )
        cors = origin is not None and (origin in allowed_origins or "*" in allowed_origins)
        preflight = (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        )
        response: web.StreamResponse
        if refusal is not None:
            response = json_error(403, refusal)
        elif preflight:
            if not cors:
                response = json_error(403, "CORS origin not allowed (POLLEN_CORS_ORIGINS)")
            else:
                response = web.Response(status=204)
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "GET, POST, OPTIONS"
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = "Authorization, Content-Type"
                response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = "600"
        else:
            response = await handler(request)
        if cors and origin is not None and not response.prepared:
            star = "*" in allowed_origins and origin not in allowed_origins
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*" if star else origin
            if not star:
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _EXPOSED
            response.headers.add(hdrs.VARY, "Origin")
        return response

    return middleware


async def nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer, streamed ones too, is taken for what it says."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
