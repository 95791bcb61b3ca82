"""Brokers and Pollen's Redis over TLS with client certificates, configured the way users
configure them: in their Celery app (``broker_use_ssl``), read by Pollen through ``-A``."""

from __future__ import annotations

from pathlib import Path

import redis

from tests.deploy import checks
from tests.deploy.conftest import Certs, Deployment, tls_redis, write_project
from tests.support.replies import raw_list
from tests.support.servers import RabbitNode


def test_rabbitmq_over_tls_with_renamed_exchanges(
    rabbit_tls: RabbitNode, certs: Certs, tmp_path: Path
) -> None:
    """A RabbitMQ node that only speaks TLS and wants a client certificate; the app renames
    the event and control exchanges and logs in with AMQPLAIN. Pollen gets all of it from
    the app alone: no POLLEN_BROKER_URL."""
    project = tmp_path / "project"
    write_project(
        project,
        "acme_tls",
        f"""
        app.conf.broker_url = "amqps://guest:guest@localhost:{rabbit_tls.port}//"
        app.conf.broker_use_ssl = {{
            "ca_certs": {str(certs.ca)!r},
            "certfile": {str(certs.client_cert)!r},
            "keyfile": {str(certs.client_key)!r},
            "cert_reqs": ssl.CERT_REQUIRED,
        }}
        app.conf.broker_login_method = "AMQPLAIN"
        app.conf.event_exchange = "acme.events"
        app.conf.control_exchange = "acme.control"
        """,
    )
    state = tls_redis(tmp_path / "state", certs).start()
    d = Deployment(
        project,
        "acme_tls",
        {
            "POLLEN_REDIS_URL": f"rediss://localhost:{state.port}/1?ssl_ca_certs={certs.ca}"
            f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}"
            "&ssl_cert_reqs=required",
            "POLLEN_NAMESPACE": "tls",
            **checks.QUICK,
        },
    )
    try:
        d.start()
        app = d.app()
        checks.worker_inspected(d)
        checks.tasks_seen(d, app, 5, tag=1)
        checks.control_works(d, "extra")
        # RabbitMQ has no backlog queue until something declares it: the worker does not
        with app.connection_for_write() as conn:
            conn.default_channel.queue_declare("backlog", durable=True, auto_delete=False)
        checks.backlog_measured(d, app, "backlog", 3)
        # the default exchange names were never used: the app's names are
        with app.connection_for_write() as conn:
            channel = conn.channel()
            try:
                channel.exchange_declare("celeryev", "topic", passive=True)
                raise AssertionError("something declared the default event exchange")
            except conn.channel_errors:
                pass
        checks.no_tracebacks(d)
    finally:
        d.stop()
        state.stop()


def test_redis_broker_over_tls_with_a_key_prefix(certs: Certs, tmp_path: Path) -> None:
    """``rediss://`` with a client certificate, and ``global_keyprefix``: events come through
    the prefixed pub/sub channels, queue lengths from the prefixed lists (priority steps
    included). Pollen's own Redis is the same TLS server, another db."""
    server = tls_redis(tmp_path / "redis", certs).start()
    project = tmp_path / "project"
    write_project(
        project,
        "acme_rediss",
        f"""
        app.conf.broker_url = "rediss://localhost:{server.port}/0"
        app.conf.broker_use_ssl = {{
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": {str(certs.ca)!r},
            "ssl_certfile": {str(certs.client_cert)!r},
            "ssl_keyfile": {str(certs.client_key)!r},
        }}
        app.conf.broker_transport_options = {{
            "global_keyprefix": "acme:",
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
        }}
        """,
    )
    d = Deployment(
        project,
        "acme_rediss",
        {
            "POLLEN_REDIS_URL": f"rediss://localhost:{server.port}/1?ssl_ca_certs={certs.ca}"
            f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}",
            "POLLEN_NAMESPACE": "tls",
            **checks.QUICK,
        },
    )
    try:
        d.start()
        app = d.app()
        checks.worker_inspected(d)
        checks.tasks_seen(d, app, 5, tag=2)
        checks.control_works(d, "extra")
        checks.backlog_measured(d, app, "backlog", 4)
        broker = redis.Redis(port=server.port, db=0, **server.client)  # type: ignore[arg-type]
        try:
            lists = {k.decode() for k in raw_list(broker.keys("*backlog*"))}
            assert lists and all(k.startswith("acme:") for k in lists), lists
        finally:
            broker.close()
        checks.no_tracebacks(d)
    finally:
        d.stop()
        server.stop()
