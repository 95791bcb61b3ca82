"""Capped exponential backoff with one log line per outage, for every reconnect loop."""

from __future__ import annotations

import logging
import random


class Backoff:
    """Call ``failed(exc)`` on each failed attempt and sleep ``delay()``; ``recovered()`` on
    success. Logs a warning when an outage starts and an info line when it ends."""

    def __init__(self, what: str, log: logging.Logger, first: float = 0.1, cap: float = 5.0):
        self.what = what
        self.log = log
        self.first = first
        self.cap = cap
        self.attempts = 0

    @property
    def in_outage(self) -> bool:
        return self.attempts > 0

    def failed(self, exc: BaseException) -> None:
        if self.attempts == 0:
            self.log.warning(
                "%s unavailable (%s: %s); retrying", self.what, type(exc).__name__, exc
            )
        self.attempts += 1

    def recovered(self) -> None:
        if self.attempts:
            self.log.info("%s is back after %d retries", self.what, self.attempts)
        self.attempts = 0

    def delay(self) -> float:
        base: float = min(self.cap, self.first * 2.0 ** min(self.attempts, 16))
        return base * (0.5 + random.random() / 2)
