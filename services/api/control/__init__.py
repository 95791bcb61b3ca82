"""Worker and task control through the API, on Flower's paths, with an audit trail.

Every mutating call goes through ``audit.audited``: the caller's role is checked (403 when
``POLLEN_READ_ONLY`` or the caller's credential is read-only) and the call is recorded in
``<ns>:audit`` whatever its outcome: who (the credential's name), what (action, target,
parameters), when, and the answer (status and body).

A worker is known when its events reached Redis or the enabler has inspect answers from it;
no inspect cache has to hold it. Blocking Celery calls run in a bounded thread pool
(``POLLEN_CONTROL_CONCURRENCY``); a broker or result backend outage answers 503.

Modules: ``resource`` (the Celery app, thread pool and lanes; app key ``CONTROL``), ``audit``
(the decorator, the trail, ``/api/audit``), ``workers`` (the worker commands, one table),
``tasks`` (task commands and publishing), ``bulk`` (revoke or re-send the tasks of a query).
"""

from services.api.control import audit, bulk, tasks, workers
from services.api.control.resource import CONTROL, control_ctx

routes = [*workers.routes, *tasks.routes, *bulk.routes, *audit.routes]
openapi_paths = {
    **workers.openapi_paths,
    **tasks.openapi_paths,
    **bulk.openapi_paths,
    **audit.openapi_paths,
}

__all__ = ["CONTROL", "control_ctx", "openapi_paths", "routes"]
