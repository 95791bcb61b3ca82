"""The app factory: middlewares (browser policy, JSON errors, auth), routes, startup and cleanup."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from services.api import (
    auth,
    control,
    events_ws,
    health,
    metrics,
    openapi,
    pages,
    stats,
    tasks,
    ui,
    workers,
)
from services.api.browser import browser_middleware, nosniff
from services.api.context import CONTEXT, make_context
from services.api.errors import error_middleware
from shared.settings import Settings, url_prefix


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
    routes: list[web.AbstractRouteDef] = [
        *tasks.routes,
        *workers.routes,
        *events_ws.routes,
        *metrics.routes,
        *health.routes,
        *stats.routes,  # aggregates for frontends (the dashboard)
        *auth.routes,  # whoami
        *ui.routes,  # the dashboard at /
        *pages.routes,  # Flower's page URLs
    ]
    extra_spec: openapi.Spec = {
        **stats.openapi_paths,
        **auth.openapi_paths,
        **ui.openapi_paths,
        **pages.openapi_paths,
    }
    routes.extend(control.routes)  # worker and task control
    extra_spec.update(control.openapi_paths)
    app.on_startup.append(control.on_startup)
    app.on_cleanup.append(control.on_cleanup)
    prefix = url_prefix(settings)
    routes.append(openapi.handler(openapi.build(extra_spec, prefix)))
    app.add_routes(under(prefix, routes))
    if prefix:  # the prefix itself: to the dashboard, whose relative links need the slash
        app.add_routes([web.get(prefix, _prefix_root, name="prefix-root")])
    app.cleanup_ctx.append(events_ws.hub_ctx)
    app.on_cleanup.append(_close_redis)
    return app
