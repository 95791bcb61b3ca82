"""Authentication and authorisation shared by every endpoint (the control routes included).

Credentials come from ``POLLEN_API_TOKENS`` (bearer tokens, ``token:ro`` read-only) and
``POLLEN_BASIC_AUTH`` (``user:password`` pairs). Secrets are compared with
``hmac.compare_digest`` against every configured credential, so the time taken does not tell
which one nearly matched. With no credentials configured every caller has full rights, and
``__main__`` refuses to bind a non-loopback address unless ``POLLEN_UNAUTHENTICATED_API=1``.

Handlers of mutating endpoints call ``require_control(request)``: 403 when the API is
read-only (``POLLEN_READ_ONLY``) or the caller's credential is.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict

from services.api.errors import ApiError, Handler, forbidden
from shared.settings import Settings, parse_basic_auth, parse_tokens

#: Names of the routes that are WebSocket handshakes (services/api/events_ws.py names them).
WEBSOCKET_ROUTES = frozenset({"events", "flower-events", "flower-task-events"})
#: Routes (by name, so under any POLLEN_URL_PREFIX) served without credentials when
#: ``POLLEN_OPEN_HEALTH`` is on.
HEALTH_ROUTES = frozenset({"healthz", "readyz", "metrics", "healthcheck"})
#: Routes always served without credentials (they reveal nothing about the cluster): the API's
#: description, the dashboard's own files (its data comes from the API, with credentials) and
#: the redirects of Flower's page URLs to the dashboard (services/api/pages.py).
PUBLIC_ROUTES = frozenset(
    {"openapi", "dashboard", "dashboard-asset", "prefix-root", "page-task", "page-worker"}
    | {"page-tasks", "page-broker"}
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a credential's name (never the secret) and whether it may control."""

    name: str
    can_control: bool


#: The caller when no credentials are configured (an open API has full rights).
ANONYMOUS = Principal("anonymous", can_control=True)
#: A caller without credentials on an open path of an API that has credentials.
UNAUTHENTICATED = Principal("unauthenticated", can_control=False)
PRINCIPAL_KEY = web.RequestKey("pollen.principal", Principal)


@dataclass(frozen=True, slots=True)
class Credentials:
    tokens: tuple[tuple[bytes, bool], ...]  # (secret, read_only)
    basic: tuple[tuple[bytes, bytes, bool], ...]  # (user, password, read_only)

    @property
    def configured(self) -> bool:
        return bool(self.tokens or self.basic)

    @classmethod
    def from_settings(cls, settings: Settings) -> Credentials:
        # validated when the settings loaded (a bad credential stops the service there)
        tokens = tuple((t.encode(), ro) for t, ro in parse_tokens(settings.api_tokens))
        basic = tuple(
            (u.encode(), p.encode(), ro) for u, p, ro in parse_basic_auth(settings.basic_auth)
        )
        return cls(tokens, basic)

    def check_token(self, presented: bytes) -> Principal | None:
        found: Principal | None = None
        for i, (secret, read_only) in enumerate(self.tokens):
            # compare against every token: no early exit
            if hmac.compare_digest(secret, presented) and found is None:
                found = Principal(f"token#{i + 1}{':ro' if read_only else ''}", not read_only)
        return found

    def check_basic(self, user: bytes, password: bytes) -> Principal | None:
        found: Principal | None = None
        for known_user, known_password, read_only in self.basic:
            same_user = hmac.compare_digest(known_user, user)
            same_password = hmac.compare_digest(known_password, password)
            if same_user and same_password and found is None:
                name = f"user:{known_user.decode(errors='replace')}{':ro' if read_only else ''}"
                found = Principal(name, not read_only)
        return found


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(settings: Settings) -> str | None:
    """Why the API must not start on ``api_host`` (None: fine)."""
    if Credentials.from_settings(settings).configured or settings.unauthenticated_api:
        return None
    if is_loopback(settings.api_host):
        return None
    return (
        f"refusing to bind {settings.api_host!r} with no credentials: set POLLEN_API_TOKENS or "
        "POLLEN_BASIC_AUTH, or POLLEN_UNAUTHENTICATED_API=1 to serve an open API"
    )


def _challenge(credentials: Credentials) -> CIMultiDict[str]:
    """One ``WWW-Authenticate`` header per scheme, Basic first: browsers prompt for basic
    auth only when they can parse its challenge, and Chromium gives up on a single header
    listing both schemes."""
    challenge: CIMultiDict[str] = CIMultiDict()
    if credentials.basic:
        challenge.add(hdrs.WWW_AUTHENTICATE, 'Basic realm="pollen", charset="UTF-8"')
    if credentials.tokens:
        challenge.add(hdrs.WWW_AUTHENTICATE, 'Bearer realm="pollen"')
    return challenge


def authenticate(request: web.Request, credentials: Credentials) -> Principal | None:
    """The caller's principal from the Authorization header (or, for a WebSocket upgrade, the
    ``token`` query parameter); None when the credentials are missing or wrong."""
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return credentials.check_token(value.encode())
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        return credentials.check_basic(user, password) if sep else None
    # a browser cannot set headers on a WebSocket handshake: only there a query token counts
    token = request.query.get("token")
    if token and is_websocket_handshake(request):
        return credentials.check_token(token.encode())
    return None


def is_websocket_handshake(request: web.Request) -> bool:
    """A GET upgrading to a WebSocket on one of the relay's routes."""
    return (
        request.method == hdrs.METH_GET
        and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and request.match_info.route.name in WEBSOCKET_ROUTES
    )


def auth_middleware(settings: Settings) -> Middleware:
    credentials = Credentials.from_settings(settings)
    open_routes = PUBLIC_ROUTES | (HEALTH_ROUTES if settings.open_health else frozenset())

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not credentials.configured:
            request[PRINCIPAL_KEY] = ANONYMOUS
            return await handler(request)
        principal = authenticate(request, credentials)
        if principal is None:
            if request.match_info.route.name in open_routes or request.method == hdrs.METH_OPTIONS:
                request[PRINCIPAL_KEY] = UNAUTHENTICATED
                return await handler(request)
            has_credentials = hdrs.AUTHORIZATION in request.headers or (
                "token" in request.query and is_websocket_handshake(request)
            )
            message = "invalid credentials" if has_credentials else "authentication required"
            raise ApiError(401, message, _challenge(credentials))
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    return middleware


def principal(request: web.Request) -> Principal:
    found: Principal = request.get(PRINCIPAL_KEY, UNAUTHENTICATED)
    return found


def require_control(request: web.Request, settings: Settings) -> Principal:
    """For mutating endpoints: the caller, or 403 when the API or the credential is read-only."""
    if settings.read_only:
        raise forbidden("read only mode is enabled (POLLEN_READ_ONLY)")
    who = principal(request)
    if not who.can_control:
        raise forbidden("this credential is read-only")
    return who
