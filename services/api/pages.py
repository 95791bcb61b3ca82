"""Flower's page URLs, so links people pasted from Flower land on the dashboard's view.

``/task/<uuid>``, ``/worker/<name>``, ``/tasks`` and ``/broker`` redirect (302) to the
dashboard's matching view (``/broker``: the charts, which hold the queue lengths); they reveal
nothing, so they need no credentials (the view asks for them). ``/workers`` redirects too,
except ``/workers?json=1``, which answers as Flower's ``WorkersView`` does:
``{"data": [worker, ...]}``, each worker its events counted by type, celery's ``Worker`` fields
and ``status`` (alive); that is data, so it needs the API's credentials. Everything lives
under ``POLLEN_URL_PREFIX`` like every other route.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import msgspec
from aiohttp import web

from services.api import params
from services.api.context import ctx
from services.api.openapi import ERRORS, Spec, json_body, operation, param
from services.api.stats import worker_rows
from shared.events import WORKER_EVENT_FIELDS
from shared.settings import url_prefix


def _to_view(request: web.Request, view: str) -> web.HTTPFound:
    return web.HTTPFound(f"{url_prefix(ctx(request).settings)}/#/{view}")


async def task_page(request: web.Request) -> web.StreamResponse:
    raise _to_view(request, "task/" + quote(request.match_info["uuid"], safe=""))


async def worker_page(request: web.Request) -> web.StreamResponse:
    raise _to_view(request, "worker/" + quote(request.match_info["name"], safe="@"))


async def tasks_page(request: web.Request) -> web.StreamResponse:
    raise _to_view(request, "tasks")


async def broker_page(request: web.Request) -> web.StreamResponse:
    raise _to_view(request, "charts")


async def workers_page(request: web.Request) -> web.StreamResponse:
    if not params.boolean(request.query, "json", False):
        raise _to_view(request, "workers")
    data = []
    for row in await worker_rows(ctx(request), time.time()):
        if row["pid"] is None and row["last_heartbeat"] is None:
            continue  # known from task events or inspect answers only: not in Flower's state
        worker: dict[str, Any] = dict(row["events"])
        worker.update({field: row[field] for field in WORKER_EVENT_FIELDS})
        # celery keeps the last few heartbeat times; Pollen stores the newest one
        last = row["last_heartbeat"]
        worker["heartbeats"] = [last] if last is not None else []
        worker["status"] = row["alive"]
        data.append(worker)
    return web.Response(body=msgspec.json.encode({"data": data}), content_type="application/json")


# names: auth.PUBLIC_ROUTES (all but page-workers, which answers data)
routes: list[Any] = [
    web.get("/task/{uuid}", task_page, name="page-task"),
    web.get("/worker/{name}", worker_page, name="page-worker"),
    web.get("/tasks", tasks_page, name="page-tasks"),
    web.get("/broker", broker_page, name="page-broker"),
    web.get("/workers", workers_page, name="page-workers"),
]

openapi_paths: Spec = {
    "/workers": operation(
        "get",
        "Flower's workers page: ?json=1 answers its JSON, else the dashboard",
        [param("json", "1: Flower's {data: [worker]} answer")],
        json_body("the workers as Flower's WorkersView gives them"),
        {"302": {"description": "to the dashboard's workers view"}, **ERRORS},
    ),
    **{
        path: operation(
            "get",
            f"Flower's page URL: redirects to the dashboard's {view} view",
            [param(name, name, where="path") for name in names],
            None,
            {"302": {"description": "to the dashboard"}},
        )
        for path, view, names in (
            ("/task/{uuid}", "task", ("uuid",)),
            ("/worker/{name}", "worker", ("name",)),
            ("/tasks", "tasks", ()),
            ("/broker", "charts", ()),
        )
    },
}
