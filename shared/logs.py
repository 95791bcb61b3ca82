"""One log format for every service: time, service, level, logger, message, on stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kombu/amqp are chatty at INFO about reconnects we already report once per outage
    for noisy in ("kombu", "amqp", "celery"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
