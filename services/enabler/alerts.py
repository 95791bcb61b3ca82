"""Alert rules (``shared/alerts.py``), evaluated by the active enabler every
``POLLEN_ALERT_INTERVAL``: one process at a time, by the enabler's lease.

Each evaluation measures every enabled rule's figure for every subject it matches, from what
the collector and the enabler already keep in Redis, and moves each (rule, subject) alert:
nothing -> pending (the figure reached the threshold) -> firing (it stayed there
``for_seconds``) -> resolved (it went below, or the rule was disabled or removed), recording
each firing and resolution in ``<ns>:alerts:log``. A firing and a resolution are delivered to
the rule's receivers in the background, each attempt recorded, retried twice (1 s, then 2 s
later) when it fails; Alertmanager, which forgets an alert that is not sent again, gets each
firing alert again every ``AM_RESEND`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec

from shared.alerts import (
    LOG_MAXLEN,
    SUBJECT,
    Alert,
    Receiver,
    Rule,
    alert_field,
    parse_receivers,
)
from shared.connections import REDIS_ERRORS
from shared.histograms import labels, quantile
from shared.keys import RUNTIME_BUCKETS, SEP, Keys, Shard
from shared.readers import worker_alive
from shared.settings import Settings
from shared.workers import event_state, known_workers, lost_counts

log = logging.getLogger("pollen.enabler.alerts")

_decode_rule = msgspec.json.Decoder(Rule).decode
_decode_alert = msgspec.json.Decoder(Alert).decode
_decode = msgspec.json.decode
_encode = msgspec.json.encode
#: Delivery attempts per notification, and the wait before each retry (seconds).
ATTEMPTS = 3
RETRY_WAIT = (1.0, 2.0)
#: Seconds before Alertmanager gets a firing alert again (it expires it past ``endsAt``).
AM_RESEND = 60.0
#: Most deliveries in flight at once, and how long one attempt may take.
CONCURRENT = 8
TIMEOUT = 10.0
#: Minutes of per-minute counters read from Redis in one pipeline.
MINUTES_PER_READ = 60
_RUNTIME = labels(RUNTIME_BUCKETS)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def payload(
    receiver: Receiver, status: str, alert: Alert, now: float, resend: float = AM_RESEND
) -> tuple[str, Any]:
    """The URL and JSON body of a notification, in the receiver's format (``resend``: the
    longest time before Alertmanager hears of a firing alert again)."""
    subject_label = SUBJECT[alert.kind]
    summary = f"{alert.rule}: {subject_label} {alert.subject} ({alert.kind} {alert.value:g})"
    if receiver.kind == "alertmanager":
        ends = now if status == "resolved" else now + 3 * resend
        body = [
            {
                "labels": {
                    "alertname": alert.rule,
                    "severity": alert.severity,
                    subject_label: alert.subject,
                    "source": "pollen",
                },
                "annotations": {
                    "summary": summary,
                    "description": alert.description or f"{alert.kind} is {alert.value:g}",
                },
                "startsAt": _iso(alert.fired_at or alert.since),
                "endsAt": _iso(ends),
            }
        ]
        return receiver.url.rstrip("/") + "/api/v2/alerts", body
    if receiver.kind == "slack":
        mark = ":white_check_mark:" if status == "resolved" else ":rotating_light:"
        text = f"{mark} [{status.upper()}] {summary}"
        if alert.description:
            text += f"\n{alert.description}"
        return receiver.url, {"text": text}
    return receiver.url, {
        "status": status,
        "rule": alert.rule,
        "kind": alert.kind,
        "subject": alert.subject,
        subject_label: alert.subject,
        "severity": alert.severity,
        "value": alert.value,
        "description": alert.description,
        "since": alert.since,
        "fired_at": alert.fired_at,
        "time": now,
        "source": "pollen",
    }


class Alerts:
    def __init__(self, redis: Any, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.receivers = parse_receivers(settings.alert_receivers)
        # a firing alert reaches Alertmanager again at the next evaluation past AM_RESEND
        self.resend = max(AM_RESEND, settings.alert_interval)
        self.deliveries: set[asyncio.Task[None]] = set()
        self.lane = asyncio.Semaphore(CONCURRENT)
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        for task in list(self.deliveries):
            task.cancel()
        await asyncio.gather(*self.deliveries, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    # --- evaluation ----------------------------------------------------------------------------

    async def evaluate(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        raw_rules = await self.redis.hgetall(self.keys.alert_rules)
        rules: dict[str, Rule] = {}
        for name, raw in raw_rules.items():
            try:
                rules[name.decode()] = _decode_rule(raw)
            except msgspec.MsgspecError as exc:  # written by hand past the API
                log.warning("alert rule %r skipped: %s", name.decode(), exc)
        old: dict[str, Alert] = {}
        for field, raw in (await self.redis.hgetall(self.keys.alert_state)).items():
            try:
                old[field.decode()] = _decode_alert(raw)
            except msgspec.MsgspecError as exc:
                log.warning("alert state %r dropped: %s", field.decode(), exc)
        live: dict[str, Alert] = {}
        fired: list[Alert] = []
        resend: list[Alert] = []
        for name, rule in sorted(rules.items()):
            if not rule.enabled:
                continue
            try:
                measured = await self.measure(rule, now)
            except REDIS_ERRORS:
                raise
            except Exception:
                # one rule's failure (odd data, a bug) leaves its alerts as they were
                log.exception("alert rule %r could not be evaluated", name)
                live.update({f: a for f, a in old.items() if a.rule == name})
                continue
            for subject, value in sorted(measured.items()):
                field = alert_field(name, subject)
                alert = old.get(field) or Alert(
                    rule=name,
                    subject=subject,
                    kind=rule.kind,
                    severity=rule.severity,
                    receivers=list(rule.receivers),
                    description=rule.description,
                    state="pending",
                    value=value,
                    since=now,
                )
                alert = msgspec.structs.replace(
                    alert,
                    value=value,
                    severity=rule.severity,
                    receivers=list(rule.receivers),
                    description=rule.description,
                )
                if alert.state == "pending" and now - alert.since >= rule.for_seconds:
                    alert = msgspec.structs.replace(
                        alert, state="firing", fired_at=now, sent_at=now
                    )
                    fired.append(alert)
                elif alert.state == "firing" and (
                    alert.sent_at is None or now - alert.sent_at >= AM_RESEND
                ):
                    alert = msgspec.structs.replace(alert, sent_at=now)
                    resend.append(alert)
                live[field] = alert
        resolved = [a for f, a in old.items() if f not in live and a.state == "firing"]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.alert_state)
        if live:
            pipe.hset(self.keys.alert_state, mapping={f: _encode(a) for f, a in live.items()})
        for status, alerts in (("firing", fired), ("resolved", resolved)):
            for alert in alerts:
                self._log(pipe, {"time": now, "event": status, **_brief(alert)})
        await pipe.execute()
        for alert in fired:
            log.warning(
                "alert firing: %s %s (%s %g)", alert.rule, alert.subject, alert.kind, alert.value
            )
            self.notify("firing", alert, now)
        for alert in resolved:
            log.info("alert resolved: %s %s", alert.rule, alert.subject)
            self.notify("resolved", alert, now)
        for alert in resend:
            self.notify("firing", alert, now, only="alertmanager")

    async def measure(self, rule: Rule, now: float) -> dict[str, float]:
        """Subject -> figure for the subjects of ``rule`` at or past its threshold."""
        found = await _MEASURES[rule.kind](self, rule, now)
        return {
            s: v
            for s, v in found.items()
            if fnmatch.fnmatchcase(s, rule.match) and v >= rule.threshold
        }

    async def _minutes(
        self, rule: Rule, now: float, key: Callable[[Shard, int], str]
    ) -> list[dict[bytes, bytes]]:
        last = int(now // 60)
        first = last - max(1, rule.window // 60) + 1
        out: list[dict[bytes, bytes]] = []
        for chunk in range(first, last + 1, MINUTES_PER_READ):
            pipe = self.redis.pipeline(transaction=False)
            for m in range(chunk, min(chunk + MINUTES_PER_READ, last + 1)):
                for shard in self.keys.all_shards:
                    pipe.hgetall(key(shard, m))
            out.extend(await pipe.execute())
        return out

    async def _outcomes(self, rule: Rule, now: float) -> tuple[Counter[str], Counter[str]]:
        failed: Counter[str] = Counter()
        succeeded: Counter[str] = Counter()
        for counts in await self._minutes(rule, now, Shard.minute):
            for field, value in counts.items():
                name, _, state = field.decode().rpartition(SEP)
                if state == "FAILURE":
                    failed[name] += int(value)
                elif state == "SUCCESS":
                    succeeded[name] += int(value)
        return failed, succeeded

    async def _failure_count(self, rule: Rule, now: float) -> dict[str, float]:
        failed, _ = await self._outcomes(rule, now)
        return {name: float(n) for name, n in failed.items() if n > 0}

    async def _failure_rate(self, rule: Rule, now: float) -> dict[str, float]:
        failed, succeeded = await self._outcomes(rule, now)
        return {name: n / (n + succeeded[name]) for name, n in failed.items() if n > 0}

    async def _new_exception(self, rule: Rule, now: float) -> dict[str, float]:
        pipe = self.redis.pipeline(transaction=False)
        for shard in self.keys.all_shards:
            pipe.zrange(shard.failures_first, 0, -1, withscores=True)
        first: dict[str, float] = {}
        for pairs in await pipe.execute():
            for member, score in pairs:
                name = member.decode()
                first[name] = min(first.get(name, score), score)
        # the value is the first time: at or past the threshold (0 by default) while new
        return {c: t for c, t in first.items() if t >= now - rule.window}

    async def _queues(self) -> list[dict[str, Any]]:
        samples = [_decode(v) for v in (await self.redis.hgetall(self.keys.queues)).values()]
        return [s for s in samples if isinstance(s, dict) and isinstance(s.get("name"), str)]

    async def _queue_length(self, rule: Rule, now: float) -> dict[str, float]:
        return {
            s["name"]: float(s["messages"])
            for s in await self._queues()
            if isinstance(s.get("messages"), int | float)
        }

    async def _oldest_message(self, rule: Rule, now: float) -> dict[str, float]:
        out = {}
        for s in await self._queues():
            oldest = s.get("oldest")
            if isinstance(oldest, dict) and isinstance(oldest.get("age"), int | float):
                out[s["name"]] = float(oldest["age"])
        return out

    async def _worker_down(self, rule: Rule, now: float) -> dict[str, float]:
        hosts = await known_workers(self.redis, self.keys)
        states = await event_state(self.redis, self.keys, hosts)
        return {
            host: 1.0
            for host, (h, seen) in zip(hosts, states, strict=True)
            if not worker_alive(h, seen, now)
        }

    async def _lost_tasks(self, rule: Rule, now: float) -> dict[str, float]:
        per_name: Counter[str] = Counter()
        for (_, name), n in (await lost_counts(self.redis, self.keys)).items():
            per_name[name] += n
        return {name: float(n) for name, n in per_name.items() if n > 0}

    async def _runtime(self, rule: Rule, now: float) -> dict[str, float]:
        rows: defaultdict[str, list[float]] = defaultdict(lambda: [0.0] * len(_RUNTIME))
        for counts in await self._minutes(rule, now, Shard.runtime_minute):
            for field, value in counts.items():
                name, _, bucket = field.decode().rpartition(SEP)
                if bucket in _RUNTIME:
                    rows[name][_RUNTIME[bucket]] += float(value)
        out: dict[str, float] = {}
        for name, row in rows.items():
            estimate = quantile(rule.percentile, row, RUNTIME_BUCKETS)
            if estimate is not None:
                out[name] = estimate
        return out

    # --- delivery ------------------------------------------------------------------------------

    def _log(self, pipe: Any, record: dict[str, Any]) -> None:
        pipe.xadd(self.keys.alert_log, {"e": _encode(record)}, maxlen=LOG_MAXLEN, approximate=True)

    def notify(self, status: str, alert: Alert, now: float, only: str | None = None) -> None:
        for name in alert.receivers:
            receiver = self.receivers.get(name)
            if only is not None and (receiver is None or receiver.kind != only):
                continue
            task = asyncio.create_task(self._deliver(name, receiver, status, alert, now))
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)

    async def _deliver(
        self, name: str, receiver: Receiver | None, status: str, alert: Alert, now: float
    ) -> None:
        record: dict[str, Any] = {
            "event": "delivery",
            "status": status,
            "receiver": name,
            **_brief(alert),
        }
        if receiver is None:
            await self._record({**record, "time": time.time(), "attempt": 1, "ok": False,
                                "error": "no such receiver in POLLEN_ALERT_RECEIVERS"})  # fmt: skip
            return
        url, body = payload(receiver, status, alert, now, self.resend)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        for attempt in range(1, ATTEMPTS + 1):
            http_status: int | None = None
            error: str | None = None
            async with self.lane:
                try:
                    async with self._http.post(url, json=body) as resp:
                        http_status = resp.status
                        await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # the exception's name only: its text may hold the URL, and its token
                    error = type(exc).__name__
            ok = http_status is not None and 200 <= http_status < 300
            if http_status is not None and not ok:
                error = f"HTTP {http_status}"
            await self._record(
                {**record, "time": time.time(), "kind_of_receiver": receiver.kind,
                 "attempt": attempt, "ok": ok, "http_status": http_status, "error": error}
            )  # fmt: skip
            if ok:
                return
            if attempt < ATTEMPTS:
                await asyncio.sleep(RETRY_WAIT[attempt - 1])
        log.warning("alert %s %s not delivered to %s: %s", alert.rule, alert.subject, name, error)

    async def _record(self, record: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # a record lost to a Redis outage is not fatal
            pipe = self.redis.pipeline(transaction=False)
            self._log(pipe, record)
            await pipe.execute()


def _brief(alert: Alert) -> dict[str, Any]:
    return {
        "rule": alert.rule,
        "subject": alert.subject,
        "kind": alert.kind,
        "severity": alert.severity,
        "value": alert.value,
    }


_MEASURES = {
    "failure_count": Alerts._failure_count,
    "failure_rate": Alerts._failure_rate,
    "new_exception": Alerts._new_exception,
    "queue_length": Alerts._queue_length,
    "oldest_message": Alerts._oldest_message,
    "worker_down": Alerts._worker_down,
    "lost_tasks": Alerts._lost_tasks,
    "runtime": Alerts._runtime,
}
