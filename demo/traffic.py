"""Demo traffic: a steady mix of successes, failures, retries, slow tasks, rejects and revokes.

``python -m demo.traffic [--rate 5]`` sends about ``rate`` tasks a second to the demo app's
worker through ``POLLEN_BROKER_URL`` until stopped. ``--check`` only checks that the broker
answers (exit 0) or not (exit 1), for a container healthcheck.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
import time
from types import FrameType

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

log = logging.getLogger("pollen.demo.traffic")

#: (task name, args, kwargs, options, weight)
MIX: list[tuple[str, tuple[object, ...], dict[str, object], dict[str, object], int]] = [
    ("demo.app.add", (2, 3), {}, {}, 30),
    ("demo.app.mul", (4, 5), {}, {}, 15),
    ("demo.app.random_work", (), {}, {}, 20),
    ("demo.app.fail", ("demo failure",), {}, {}, 6),
    ("demo.app.flaky", (), {"succeed_on": 1}, {}, 6),
    ("demo.app.slow", (3.0,), {}, {}, 4),
    ("demo.app.progress", (4,), {}, {}, 5),
    ("demo.app.reject", (), {}, {}, 2),
    ("demo.app.add", (1, 1), {}, {"countdown": 10}, 4),  # revoked before it runs, often
]


def client(broker_url: str) -> Celery:
    app = Celery("demo-traffic", broker=broker_url)
    app.conf.task_send_sent_event = True
    app.conf.broker_connection_retry_on_startup = True
    return app


def broker_answers(broker_url: str) -> bool:
    try:
        with client(broker_url).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception as exc:
        print(f"broker {maybe_sanitize_url(broker_url)}: {exc}", file=sys.stderr)
        return False


def run(broker_url: str, rate: float, stop: threading.Event) -> None:
    app = client(broker_url)
    weights = [item[4] for item in MIX]
    sent = 0
    while not stop.is_set():
        name, args, kwargs, options, _ = random.choices(MIX, weights)[0]
        try:
            result = app.send_task(name, args, kwargs, **options)
            sent += 1
            if options.get("countdown") and random.random() < 0.5:
                app.control.revoke(result.id)
        except Exception as exc:  # broker restarting: keep going, say so once in a while
            log.warning("could not send %s: %s", name, exc)
            stop.wait(1.0)
        stop.wait(random.expovariate(rate))
    log.info("traffic stopped after %d tasks", sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=5.0, help="tasks per second (mean)")
    parser.add_argument("--check", action="store_true", help="exit 0 if the broker answers")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s traffic %(message)s")
    broker = os.environ.get("POLLEN_BROKER_URL", "redis://127.0.0.1:6379/0")
    if options.check:
        sys.exit(0 if broker_answers(broker) else 1)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("sending about %.1f tasks/s to %s", options.rate, maybe_sanitize_url(broker))
    started = time.monotonic()
    run(broker, options.rate, stop)
    log.info("ran %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
