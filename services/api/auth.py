"""Authentication and authorisation shared by every endpoint (the control routes included).

Who calls comes from ``POLLEN_API_TOKENS`` (bearer tokens), ``POLLEN_BASIC_AUTH``
(``user:password`` pairs) or a trusted SSO proxy (``POLLEN_AUTH_PROXY_USER_HEADER``, honoured
only from ``POLLEN_AUTH_PROXY_ADDRESSES``). Each caller has a role: ``viewer`` reads,
``operator`` also controls tasks and workers, ``admin`` may also shut workers down. Tokens and
users take theirs from a ``:ro``/``:op``/``:rw`` suffix, proxy users from ``POLLEN_ROLES``
(user names and ``group:<name>`` entries). Secrets are compared with ``hmac.compare_digest``
against every configured credential, so the time taken does not tell which one nearly
matched. With no credentials configured every caller is admin, and ``__main__`` refuses to
bind a non-loopback address unless ``POLLEN_UNAUTHENTICATED_API=1``.

Handlers of mutating endpoints call ``require_role(request, settings, role)``: 403 when the
API is read-only (``POLLEN_READ_ONLY``) or the caller's role is below ``role``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass

import msgspec
from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict

from services.api.context import ctx
from services.api.errors import ApiError, Handler, forbidden
from services.api.openapi import ERRORS, Spec, json_body, operation
from shared.settings import (
    ROLES,
    Settings,
    parse_basic_auth,
    parse_networks,
    parse_roles,
    parse_tokens,
)

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
    """Who is calling: a credential's or user's name (never a secret) and its role."""

    name: str
    role: str

    def has(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def can_control(self) -> bool:
        return self.has("operator")


#: The caller when no credentials are configured (an open API has full rights).
ANONYMOUS = Principal("anonymous", "admin")
#: A caller without credentials on an open path of an API that has credentials.
UNAUTHENTICATED = Principal("unauthenticated", "viewer")
PRINCIPAL_KEY = web.RequestKey("pollen.principal", Principal)
#: What a credential's name ends in, by role (the mode it was configured with).
_SUFFIX = {"viewer": ":ro", "operator": ":op", "admin": ""}


@dataclass(frozen=True, slots=True)
class Credentials:
    tokens: tuple[tuple[bytes, str], ...]  # (secret, role)
    basic: tuple[tuple[bytes, bytes, str], ...]  # (user, password, role)
    proxy: TrustedProxy | None = None

    @property
    def configured(self) -> bool:
        return bool(self.tokens or self.basic or self.proxy)

    @classmethod
    def from_settings(cls, settings: Settings) -> Credentials:
        # validated when the settings loaded (a bad credential stops the service there)
        tokens = tuple((t.encode(), role) for t, role in parse_tokens(settings.api_tokens))
        basic = tuple(
            (u.encode(), p.encode(), role) for u, p, role in parse_basic_auth(settings.basic_auth)
        )
        return cls(tokens, basic, TrustedProxy.from_settings(settings))

    def check_token(self, presented: bytes) -> Principal | None:
        found: Principal | None = None
        for i, (secret, role) in enumerate(self.tokens):
            # compare against every token: no early exit
            if hmac.compare_digest(secret, presented) and found is None:
                found = Principal(f"token#{i + 1}{_SUFFIX[role]}", role)
        return found

    def check_basic(self, user: bytes, password: bytes) -> Principal | None:
        found: Principal | None = None
        for known_user, known_password, role in self.basic:
            same_user = hmac.compare_digest(known_user, user)
            same_password = hmac.compare_digest(known_password, password)
            if same_user and same_password and found is None:
                name = f"user:{known_user.decode(errors='replace')}{_SUFFIX[role]}"
                found = Principal(name, role)
        return found


@dataclass(frozen=True, slots=True)
class TrustedProxy:
    """An SSO proxy in front (oauth2-proxy, nginx with auth_request...) that signs users in
    and names them in a header. Only requests from its addresses may carry that header: from
    anywhere else the header is ignored, so nobody can claim a name by sending it."""

    user_header: str
    groups_header: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    roles: dict[str, str]
    default_role: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustedProxy | None:
        if not settings.auth_proxy_user_header:
            return None
        return cls(
            settings.auth_proxy_user_header,
            settings.auth_proxy_groups_header,
            tuple(parse_networks(settings.auth_proxy_addresses)),
            parse_roles(settings.roles),
            settings.auth_proxy_default_role,
        )

    def trusts(self, remote: str | None) -> bool:
        try:
            address = ipaddress.ip_address(remote or "")
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def principal(self, request: web.Request) -> Principal | None:
        """The proxy's user with the highest role any entry gives them; None: not named by
        a trusted proxy. 403 for a user no entry names when the default role is ``none``."""
        user = request.headers.get(self.user_header, "").strip()
        if not user or not self.trusts(request.remote):
            return None
        groups = request.headers.get(self.groups_header, "") if self.groups_header else ""
        members = [user, *(f"group:{g.strip()}" for g in groups.split(",") if g.strip())]
        found = [self.roles[m] for m in members if m in self.roles]
        if not found and self.default_role == "none":
            raise forbidden(f"{user} has no role in Pollen (POLLEN_ROLES)")
        role = max(found, key=ROLES.index) if found else self.default_role
        return Principal(f"sso:{user}", role)


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
    """The caller's principal from a trusted proxy's user header, the Authorization header
    (or, for a WebSocket upgrade, the ``token`` query parameter); None when the credentials
    are missing or wrong."""
    if credentials.proxy is not None:
        found = credentials.proxy.principal(request)
        if found is not None:
            return found
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


def require_role(request: web.Request, settings: Settings, role: str = "operator") -> Principal:
    """For mutating endpoints: the caller, or 403 when the API is read-only or the caller's
    role is below ``role``."""
    if settings.read_only:
        raise forbidden("read only mode is enabled (POLLEN_READ_ONLY)")
    who = principal(request)
    if not who.has(role):
        if who.role == "viewer":
            raise forbidden(f"{who.name} is read-only (role viewer)")
        raise forbidden(f"{who.name} (role {who.role}) may not do this: it needs role {role}")
    return who


# --- GET /api/whoami -------------------------------------------------------------------------


async def whoami(request: web.Request) -> web.Response:
    c = ctx(request)
    who = principal(request)
    read_only = c.settings.read_only or not who.can_control
    return web.Response(
        body=msgspec.json.encode(
            {
                "name": who.name,
                "role": who.role,
                "can_control": not read_only,
                "can_shutdown": not c.settings.read_only and who.has("admin"),
                "read_only": read_only,
            }
        ),
        content_type="application/json",
    )


routes: list[web.AbstractRouteDef] = [web.get("/api/whoami", whoami)]

#: OpenAPI paths of these endpoints (merged into ``/api/openapi.json`` by the app factory).
openapi_paths: Spec = {
    "/api/whoami": operation(
        "get",
        "The caller's credential name and whether control endpoints are allowed",
        [],
        json_body(
            "can_control is false in read-only mode or for a read-only credential",
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
                    "can_control": {"type": "boolean"},
                    "can_shutdown": {"type": "boolean"},
                    "read_only": {"type": "boolean"},
                },
            },
        ),
        {"401": ERRORS["401"]},
    ),
}
