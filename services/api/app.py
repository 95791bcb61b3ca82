"""The app factory: middlewares (browser policy, JSON errors, auth), routes, startup and cleanup."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from aiohttp import web

from services.api import (
    alerts,
    auth,
    control,
    events,
    export,
    failures,
    metrics,
    openapi,
    pages,
    probes,
    queues,
    stats,
    tasks,
    ui,
    workers,
)
from services.api.browser import browser_middleware, nosniff
from services.api.context import CONTEXT, make_context
from services.api.errors import error_middleware
from shared.settings import Settings, url_prefix


class RouteModule(Protocol):
    """What a route module exports: its routes and their OpenAPI paths, side by side."""

    @property
    def routes(self) -> Sequence[web.AbstractRouteDef]: ...

    @property
    def openapi_paths(self) -> openapi.Spec: ...


#: Every route module, in the order their routes are matched.
ROUTE_MODULES: tuple[RouteModule, ...] = (
    tasks,
    export,  # /api/tasks queries streamed whole
    failures,  # failed and retried tasks by exception class
    workers,
    queues,
    events,
    metrics,
    probes,
    stats,  # aggregates for frontends (the dashboard)
    auth,  # whoami
    ui,  # the dashboard at /
    pages,  # Flower's page URLs
    control,  # worker and task control, the audit trail
    alerts,  # alert rules (admins edit them), alerts and their history
)


async def _close_redis(app: web.Application) -> None:
    # after the cleanup contexts (the event hub), which aiohttp runs first
    await app[CONTEXT].redis.aclose()


def under(prefix: str, routes: Iterable[web.AbstractRouteDef]) -> list[web.AbstractRouteDef]:
    """``routes`` moved under ``POLLEN_URL_PREFIX`` (names and options kept)."""
    if not prefix:
        return list(routes)
    moved: list[web.AbstractRouteDef] = []
    for route in routes:
        assert isinstance(route, web.RouteDef), route
        moved.append(web.RouteDef(route.method, prefix + route.path, route.handler, route.kwargs))
    return moved


async def _prefix_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(url_prefix(request.app[CONTEXT].settings) + "/")


def make_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[browser_middleware(settings), error_middleware, auth.auth_middleware(settings)]
    )
    app.on_response_prepare.append(nosniff)
    app[CONTEXT] = make_context(settings)
    routes: list[web.AbstractRouteDef] = []
    paths: openapi.Spec = {}
    for module in ROUTE_MODULES:
        routes.extend(module.routes)
        paths.update(module.openapi_paths)
    prefix = url_prefix(settings)
    routes.append(openapi.handler(openapi.build(paths, prefix)))
    app.add_routes(under(prefix, routes))
    if prefix:  # the prefix itself: to the dashboard, whose relative links need the slash
        app.add_routes([web.get(prefix, _prefix_root, name="prefix-root")])
    app.cleanup_ctx.extend([events.hub_ctx, control.control_ctx])
    app.on_cleanup.append(_close_redis)
    return app
