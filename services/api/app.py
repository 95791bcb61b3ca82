"""The app factory: middlewares (browser policy, JSON errors, auth), routes, startup and cleanup.

Control endpoints live in ``services/api/control.py`` (``routes``, optional
``openapi_paths`` and ``on_startup``/``on_cleanup``): they are picked up below when that module
exists, and reuse ``auth.require_role``, ``errors`` and ``context`` from this package.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

from aiohttp import web

from services.api import events_ws, health, metrics, openapi, pages, stats, tasks, ui, workers
from services.api.auth import auth_middleware
from services.api.browser import browser_middleware, nosniff
from services.api.context import CONTEXT, make_context
from services.api.errors import error_middleware
from shared.settings import Settings, url_prefix


def _control_module() -> ModuleType | None:
    try:
        return importlib.import_module("services.api.control")
    except ModuleNotFoundError as exc:
        if exc.name == "services.api.control":
            return None
        raise


async def _start(app: web.Application) -> None:
    c = app[CONTEXT]
    if c.hub is None:
        c.hub = events_ws.EventHub(c)
    await c.hub.start()


async def _stop(app: web.Application) -> None:
    c = app[CONTEXT]
    if c.hub is not None:
        await c.hub.stop()
    await c.redis.aclose()


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
        middlewares=[browser_middleware(settings), error_middleware, auth_middleware(settings)]
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
        *ui.routes,  # the dashboard at /
        *pages.routes,  # Flower's page URLs
    ]
    extra_spec: openapi.Spec = {**stats.openapi_paths, **ui.openapi_paths, **pages.openapi_paths}
    control = _control_module()
    if control is not None:  # worker/task control endpoints (services/api/control.py)
        routes.extend(control.routes)
        extra_spec.update(getattr(control, "openapi_paths", {}))
        for hook, handlers in (("on_startup", app.on_startup), ("on_cleanup", app.on_cleanup)):
            if callable(getattr(control, hook, None)):
                handlers.append(getattr(control, hook))
    prefix = url_prefix(settings)
    routes.append(openapi.handler(openapi.build(extra_spec, prefix)))
    app.add_routes(under(prefix, routes))
    if prefix:  # the prefix itself: to the dashboard, whose relative links need the slash
        app.add_routes([web.get(prefix, _prefix_root, name="prefix-root")])
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app
