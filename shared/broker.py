"""The Celery app every service reaches the broker through, and what a broker outage raises.

With ``POLLEN_CELERY_APP`` (or ``-A``) it is the user's own app, loaded as ``celery -A`` loads
it, so everything the workers are configured with holds for Pollen too: broker URL and
failover list, ``broker_use_ssl``, ``broker_transport_options`` (Sentinel's ``master_name``,
``global_keyprefix``, priority steps), ``broker_login_method``, ``event_exchange``,
``control_exchange`` and the result backend. Without it, an app is built from
``POLLEN_BROKER_URL``. Explicit ``POLLEN_*`` settings win over the app's, and Pollen's own
fail-fast timeouts are laid over it: a broker outage must be an error within seconds, never a
call that retries for minutes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import msgspec
from celery import Celery
from celery.app.utils import find_app
from kombu import Connection

from shared.settings import Settings, SettingsError, env_name, mask_url

#: The broker of an app that names none (Celery's own default would be AMQP on localhost).
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

#: Transport options that make kombu fail fast; the user's others are kept.
FAIL_FAST_TRANSPORT = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


def load_app(settings: Settings, name: str) -> Celery:
    """The user's Celery app (``POLLEN_CELERY_APP``) or one of Pollen's own, ready for Pollen.

    A module that cannot be imported, or holds no Celery app, stops the service with a
    ``SettingsError`` naming the variable."""
    app = _user_app(settings.celery_app) if settings.celery_app else Celery(name)
    conf = app.conf
    if settings.broker_url:
        # an explicit URL replaces the app's, including read/write URLs that would shadow it
        conf.broker_url = settings.broker_url
        conf.broker_read_url = conf.broker_write_url = None
    elif not conf.broker_url and not conf.broker_read_url:
        conf.broker_url = DEFAULT_BROKER_URL
    if settings.result_backend:
        conf.result_backend = settings.result_backend
    options = dict(conf.broker_transport_options or {})
    options.update(transport_options(settings))
    options.update(FAIL_FAST_TRANSPORT)
    # socket timeouts of kombu's Redis transport; an app that sets its own keeps them
    options.setdefault("socket_timeout", 5)
    options.setdefault("socket_connect_timeout", 2)
    conf.update(
        broker_transport_options=options,
        broker_connection_timeout=2,
        broker_connection_retry=False,
        broker_connection_max_retries=1,
        broker_pool_limit=16,
        task_publish_retry_policy=dict(FAIL_FAST_TRANSPORT),
        redis_socket_connect_timeout=2,
        redis_socket_timeout=5,
        # Pollen's own task publishing (/api/task/apply) announces its tasks, as Flower's does
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    backend_options = dict(conf.result_backend_transport_options or {})
    backend_options.setdefault("retry_policy", {"max_retries": 1})
    conf.result_backend_transport_options = backend_options
    return app


def app_or_exit(settings: Settings, name: str) -> Celery:
    """``load_app()`` for a service's entry point: an app that cannot be loaded ends the
    process with status 2 and a message naming the variable."""
    try:
        return load_app(settings, name)
    except SettingsError as exc:
        print(f"pollen: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_app(spec: str) -> Celery:
    variable = env_name("celery_app")
    # as `celery -A`: the current directory is importable
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = find_app(spec)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"{variable}={spec!r}: cannot load the Celery app: {exc}") from None
    if not isinstance(found, Celery):
        raise SettingsError(
            f"{variable}={spec!r}: {type(found).__name__} is not a Celery app"
            " (expected module:attribute naming one)"
        )
    return found


def transport_options(settings: Settings) -> dict[str, Any]:
    """``POLLEN_BROKER_TRANSPORT_OPTIONS``, a JSON object (validated by the settings)."""
    if not settings.broker_transport_options:
        return {}
    options: dict[str, Any] = msgspec.json.decode(settings.broker_transport_options)
    return options


def transport(app: Celery) -> str:
    """kombu's driver type of the app's broker: ``amqp``, ``redis`` (also Sentinel and TLS)..."""
    driver: str = app.connection_for_read().transport.driver_type
    return driver


def event_exchange(app: Celery) -> str:
    name: str = app.conf.event_exchange
    return name


def shown_url(app: Celery) -> str:
    """The broker URL (or failover list) for logs: passwords masked."""
    url = app.conf.broker_read_url or app.conf.broker_url
    if isinstance(url, list | tuple):
        url = ";".join(url)
    return mask_url(str(url))


def broker_errors(app: Celery | None = None) -> tuple[type[BaseException], ...]:
    """What a broker outage raises from celery/kombu calls: kombu's wrappers plus, given the
    app, its transport's connection errors (redis-py's or py-amqp's)."""
    from kombu.exceptions import ConnectionError as KombuConnectionError
    from kombu.exceptions import OperationalError

    errors: tuple[type[BaseException], ...] = (
        OSError,
        ConnectionError,
        TimeoutError,
        OperationalError,
        KombuConnectionError,
    )
    if app is not None:
        # reading these properties does not connect
        conn: Connection = app.connection_for_write()
        errors += tuple(conn.connection_errors) + tuple(conn.recoverable_connection_errors)
    return tuple(dict.fromkeys(errors))
