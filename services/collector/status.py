"""The collector's own health, kept in Redis for /readyz and /metrics of every API replica.

``<ns>:collector:<id>`` (hash) holds: started, heartbeat, last_event (newest sender timestamp
applied), events_total (applied), duplicates_total, evicted_total, malformed_total,
truncated_total, dropped_total (pub/sub buffer overflow), rate (events applied per second
over the last interval), lag (seconds from the newest event's sender timestamp to its commit),
errors_redis, errors_broker, source. ``<ns>:collectors`` (zset) holds ids by heartbeat;
``<ns>:malformed`` (hash) counts malformed events by reason over all collectors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from shared.keys import Keys

log = logging.getLogger("pollen.collector")

TOTALS = (
    "events_total",
    "duplicates_total",
    "evicted_total",
    "malformed_total",
    "truncated_total",
    "errors_redis",
    "errors_broker",
)

#: A collector's hash and zset entry outlive it by this long, then vanish.
HEALTH_TTL = 86400
SAMPLE_TTL = 86400


class Status:
    def __init__(self, keys: Keys, collector_id: str, source: str) -> None:
        self.keys = keys
        self.id = collector_id
        self.source = source
        self.started = time.time()
        # every figure is written from the first report on, zeros included
        self.totals: Counter[str] = Counter(dict.fromkeys(TOTALS, 0))
        self.malformed: Counter[str] = Counter()
        self.samples: dict[str, bytes] = {}
        self.logged_reasons: set[str] = set()
        self.last_event = 0.0
        self.lag = 0.0
        self.dropped = 0
        self._interval_start = time.monotonic()
        self._interval_applied = 0
        self.rate = 0.0
        # the writer thread counts batches while the main thread counts bad input and flushes
        self.lock = threading.Lock()

    def batch(self, applied: int, duplicates: int, evicted: int, newest: float) -> None:
        with self.lock:
            self._batch(applied, duplicates, evicted, newest)

    def _batch(self, applied: int, duplicates: int, evicted: int, newest: float) -> None:
        self.totals["events_total"] += applied
        self.totals["duplicates_total"] += duplicates
        self.totals["evicted_total"] += evicted
        self._interval_applied += applied
        if newest:
            self.last_event = max(self.last_event, newest)
            self.lag = max(0.0, time.time() - newest)

    def bad(self, reason: str, sample: bytes) -> None:
        with self.lock:
            self.malformed[reason] += 1
            self.totals["malformed_total"] += 1
            self.samples[reason] = sample
        if reason not in self.logged_reasons:
            self.logged_reasons.add(reason)
            log.warning(
                "malformed event skipped (%s), counted from now on; sample: %r",
                reason,
                sample[:300],
            )

    def truncated(self, count: int) -> None:
        with self.lock:
            self.totals["truncated_total"] += count

    def error(self, kind: str) -> None:
        with self.lock:
            self.totals[f"errors_{kind}"] += 1

    def flush(self, client: Any) -> None:
        """Write the figures; raises Redis errors (the caller retries later)."""
        with self.lock:
            malformed, self.malformed = self.malformed, Counter()
            samples, self.samples = self.samples, {}
            pipe = self._pipeline(client, malformed, samples)
        try:
            pipe.execute()
        except Exception:
            with self.lock:  # not written: count them again next time
                self.malformed.update(malformed)
                self.samples = samples | self.samples
            raise

    def _pipeline(self, client: Any, malformed: Counter[str], samples: dict[str, bytes]) -> Any:
        now = time.time()
        elapsed = time.monotonic() - self._interval_start
        if elapsed > 0:
            self.rate = self._interval_applied / elapsed
        key = self.keys.collector(self.id)
        fields: dict[str, Any] = {
            "started": self.started,
            "heartbeat": now,
            "last_event": self.last_event,
            "rate": round(self.rate, 3),
            "lag": round(self.lag, 6),
            "source": self.source,
            "dropped_total": self.dropped,
            **self.totals,
        }
        pipe = client.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, HEALTH_TTL)
        pipe.zadd(self.keys.collectors, {self.id: now})
        pipe.zremrangebyscore(self.keys.collectors, "-inf", now - HEALTH_TTL)
        for reason, count in malformed.items():
            pipe.hincrby(self.keys.malformed, reason, count)
        for reason, sample in samples.items():
            pipe.set(self.keys.malformed_sample(reason), sample, ex=SAMPLE_TTL)
        self._interval_start = time.monotonic()
        self._interval_applied = 0
        return pipe
