"""``/metrics``: Prometheus text computed from Redis, so every replica reports the same.

Flower's metric names, labels and meaning (``flower/events.py: PrometheusMetrics``), each
family always written with its ``# HELP``/``# TYPE`` lines:
``flower_events_total`` (task events only, as Flower's ``observe_task``) and
``flower_task_runtime_seconds`` from the collector's ``counts`` and ``runtime`` hashes;
``flower_worker_online`` from heartbeat liveness (a crashed worker goes to 0, unlike Flower);
``flower_worker_number_of_currently_executing_tasks``: the worker's own ``active`` from its
newest heartbeat (as Flower); ``flower_task_prefetch_time_seconds``: per worker and task
name, started - received at the latest task-started, 0 after the latest task-succeeded or
task-failed (Flower's ``observe_task``, latest by sender time);
``flower_worker_prefetched_tasks``: tasks received and not yet started on the worker, by
task name, for every worker and name that ever had a task received (0 when none waits now,
as Flower's gauge goes back to 0). Plus ``pollen_*``: worker events by type, failed and
retried events by exception class, tasks lost by worker and name, collector lag, rate and
heartbeat age, malformed events by reason, tasks stored, queue lengths and consumers, the
age of a queue's oldest waiting message (where the broker can tell) and the wait histograms
``pollen_task_queue_wait_seconds`` (task-sent, or its eta when later, to task-received) and
``pollen_task_prefetch_wait_seconds`` (task-received, or its eta when later, to task-started)
by queue and task name (the collector's ``wait`` hashes).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable

import msgspec
from aiohttp import web

from services.api import failures
from services.api.context import Context, ctx
from services.api.openapi import Spec, operation
from shared.keys import HIDDEN, RUNTIME_BUCKETS, SEP, WAIT_BUCKETS, WAIT_STAGES
from shared.readers import heartbeat_active, worker_alive
from shared.workers import event_state, known_workers, lost_counts

#: Most RECEIVED tasks per worker read to label prefetched tasks by name.
PREFETCH_SCAN = 10_000
_BUCKETS = [repr(b) for b in RUNTIME_BUCKETS]
_WAIT_BUCKETS = [repr(b) for b in WAIT_BUCKETS]
_WAIT_HELP = {
    "queue": "Time a task waited in the broker: task-sent (or its eta, when later) to "
    "task-received",
    "prefetch": "Time a task waited at the worker: task-received (or its eta, when later) to "
    "task-started",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{float(value)!r}"
    return repr(float(value))


class Exposition:
    """Prometheus text with at most ``limit`` samples: one answer stays bounded whatever the
    label cardinality (task names x workers); what is left out is counted in ``dropped``."""

    def __init__(self, limit: int) -> None:
        self.lines: list[str] = []
        self.limit = limit
        self.samples = 0
        self.dropped = 0

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Iterable[tuple[str, str]], value: float) -> None:
        if self.samples >= self.limit:
            self.dropped += 1
            return
        self.samples += 1
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        self.lines.append(
            f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}"
        )

    def text(self) -> str:
        self.family(
            "pollen_metrics_samples_dropped",
            "gauge",
            "Samples left out of this answer (POLLEN_METRICS_MAX_SAMPLES)",
        )
        self.lines.append(f"pollen_metrics_samples_dropped {float(self.dropped)!r}")
        return "\n".join(self.lines) + "\n"


#: (field of the collector's health hash, metric, help) — see services/collector/status.py
_COLLECTOR_FIGURES = (
    ("rate", "pollen_collector_events_per_second", "Events applied per second"),
    ("lag", "pollen_collector_lag_seconds", "Seconds from an event's timestamp to its commit"),
    ("events_total", "pollen_collector_events_total", "Events applied by the collector"),
    (
        "duplicates_total",
        "pollen_collector_duplicates_total",
        "Events recognised as already applied (redeliveries, a second collector) and skipped",
    ),
    (
        "dropped_total",
        "pollen_collector_dropped_total",
        "Redis-broker events dropped because the collector's receive buffer was full",
    ),
    ("evicted_total", "pollen_collector_evicted_total", "Tasks evicted by retention"),
    (
        "truncated_total",
        "pollen_collector_truncated_total",
        "Events kept with fields truncated at POLLEN_MAX_FIELD_BYTES",
    ),
    ("errors_redis", "pollen_collector_redis_errors_total", "Failed writes to Redis (retried)"),
    ("errors_broker", "pollen_collector_broker_errors_total", "Broker connection failures"),
)


async def render(c: Context) -> str:
    shards = c.keys.all_shards
    pipe = c.redis.pipeline(transaction=False)
    for shard in shards:
        pipe.hgetall(shard.counts)
        pipe.hgetall(shard.runtime)
        pipe.zcard(shard.by_timestamp)
        pipe.hgetall(shard.prefetch)
        pipe.hgetall(shard.wait)
    pipe.zrange(c.keys.collectors, 0, -1, withscores=True)
    pipe.hgetall(c.keys.malformed)
    pipe.hgetall(c.keys.queues)
    replies = await pipe.execute()
    events: Counter[tuple[str, str, str]] = Counter()
    runtime: defaultdict[tuple[str, str, str], float] = defaultdict(float)
    tasks_stored = 0
    # (worker, name) -> (timestamp, seconds) of the latest event over the shards
    prefetch_time: dict[tuple[str, str], tuple[float, float]] = {}
    # (stage, queue, name, bucket) -> count (and sum, count)
    waits: defaultdict[tuple[str, str, str, str], float] = defaultdict(float)
    for i in range(len(shards)):
        counts, runtimes, stored, prefetches, wait = replies[5 * i : 5 * i + 5]
        for field, value in wait.items():
            stage, queue, name, bucket = field.decode().split(SEP, 3)
            waits[(stage, queue, name, bucket)] += float(value)
        for field, count in counts.items():
            worker, kind, name = field.decode().split(SEP, 2)
            events[(worker, kind, name)] += int(count)
        for field, count in runtimes.items():
            worker, name, bucket = field.decode().split(SEP, 2)
            runtime[(worker, name, bucket)] += float(count)
        tasks_stored += stored
        for field, value in prefetches.items():
            worker, name = field.decode().split(SEP, 1)
            stamp, _, seconds_text = value.split(b",")
            ts, seconds = float(stamp), float(seconds_text)
            if (worker, name) not in prefetch_time or ts > prefetch_time[(worker, name)][0]:
                prefetch_time[(worker, name)] = (ts, seconds)
    collectors, malformed, queues = replies[5 * len(shards) :]
    now = time.time()
    out = Exposition(c.settings.metrics_max_samples)

    out.family("flower_events_total", "counter", "Number of events")
    for (worker, kind, name), count in sorted(events.items()):
        if kind.startswith("task-"):
            labels = [("worker", worker), ("type", kind), ("task", name)]
            out.sample("flower_events_total", labels, count)
    out.family("pollen_worker_events_total", "counter", "Worker events (online, heartbeat...)")
    for (worker, kind, _), count in sorted(events.items()):
        if not kind.startswith("task-"):
            out.sample("pollen_worker_events_total", [("worker", worker), ("type", kind)], count)

    out.family("flower_task_runtime_seconds", "histogram", "Task runtime")
    series = sorted({(w, n) for w, n, _ in runtime})
    for worker, name in series:
        labels = [("worker", worker), ("task", name)]
        cumulative = 0.0
        for bucket in _BUCKETS:
            cumulative += runtime[(worker, name, bucket)]
            out.sample("flower_task_runtime_seconds_bucket", [*labels, ("le", bucket)], cumulative)
        total = runtime[(worker, name, "count")]
        out.sample("flower_task_runtime_seconds_bucket", [*labels, ("le", "+Inf")], total)
        out.sample("flower_task_runtime_seconds_count", labels, total)
        out.sample("flower_task_runtime_seconds_sum", labels, runtime[(worker, name, "sum")])

    for stage in WAIT_STAGES:
        metric = f"pollen_task_{stage}_wait_seconds"
        out.family(metric, "histogram", _WAIT_HELP[stage])
        for queue, name in sorted({(q, n) for s, q, n, _ in waits if s == stage}):
            labels = [("queue", queue), ("task", name)]
            cumulative = 0.0
            for bucket in _WAIT_BUCKETS:
                cumulative += waits[(stage, queue, name, bucket)]
                out.sample(f"{metric}_bucket", [*labels, ("le", bucket)], cumulative)
            total = cumulative + waits[(stage, queue, name, "+Inf")]
            out.sample(f"{metric}_bucket", [*labels, ("le", "+Inf")], total)
            out.sample(f"{metric}_count", labels, total)
            out.sample(f"{metric}_sum", labels, waits[(stage, queue, name, "sum")])

    hosts = await known_workers(c.redis, c.keys)
    states = await event_state(c.redis, c.keys, hosts)
    pipe = c.redis.pipeline(transaction=False)
    for host in hosts:
        for shard in shards:
            pipe.zrange(shard.by_state_worker("RECEIVED", host), 0, PREFETCH_SCAN - 1)
    replies = await pipe.execute()
    received: dict[str, list[str]] = defaultdict(list)
    for i, host in enumerate(hosts):
        for j in range(len(shards)):
            received[host].extend(m.decode() for m in replies[i * len(shards) + j])
    pipe = c.redis.pipeline(transaction=False)
    pairs = [(host, uuid) for host in hosts for uuid in received[host]]
    for _, uuid in pairs:
        pipe.hget(c.keys.shard_for(uuid).task(uuid), HIDDEN.name)
    names = await pipe.execute() if pairs else []
    # every worker and task name that had a task received: Flower's gauge exists from then on
    prefetched: Counter[tuple[str, str]] = Counter(
        {(w, n): 0 for (w, kind, n) in events if kind == "task-received"}
    )
    for (host, _), name in zip(pairs, names, strict=True):
        prefetched[(host, name.decode() if name else "")] += 1

    out.family(
        "flower_task_prefetch_time_seconds",
        "gauge",
        "The time the task spent waiting at the celery worker to be executed.",
    )
    for (host, name), (_, seconds) in sorted(prefetch_time.items()):
        out.sample("flower_task_prefetch_time_seconds", [("worker", host), ("task", name)], seconds)
    out.family(
        "flower_worker_prefetched_tasks",
        "gauge",
        "Number of tasks of given type prefetched at a worker",
    )
    for (host, name), count in sorted(prefetched.items()):
        out.sample("flower_worker_prefetched_tasks", [("worker", host), ("task", name)], count)
    out.family("flower_worker_online", "gauge", "Worker online status")
    for host, (w, seen) in zip(hosts, states, strict=True):
        out.sample("flower_worker_online", [("worker", host)], int(worker_alive(w, seen, now)))
    out.family(
        "flower_worker_number_of_currently_executing_tasks",
        "gauge",
        "Number of tasks currently executing at a worker",
    )
    for host, (w, _) in zip(hosts, states, strict=True):
        active = heartbeat_active(w)
        if active is not None:
            out.sample(
                "flower_worker_number_of_currently_executing_tasks", [("worker", host)], active
            )

    out.family(
        "pollen_task_failures_total",
        "counter",
        "task-failed and task-retried events by exception class (the first "
        "POLLEN_METRICS_EXCEPTION_LABELS classes seen; later ones under other)",
    )
    classes = await failures.summary(c)
    own = failures.labelled(classes, c.settings.metrics_exception_labels)
    failed: Counter[tuple[str, str, str, str]] = Counter()
    for cls in classes.values():
        label = cls.name if cls.name in own else "other"
        for (worker, task, subject), n in cls.series.items():
            failed[(worker, task, f"task-{subject}", label)] += n
    for (worker, task, kind, label), n in sorted(failed.items()):
        labels = [("worker", worker), ("type", kind), ("task", task), ("exception", label)]
        out.sample("pollen_task_failures_total", labels, n)

    out.family(
        "pollen_tasks_lost",
        "gauge",
        "Tasks marked lost now: RECEIVED or STARTED on a worker that died",
    )
    for (host, name), count in sorted((await lost_counts(c.redis, c.keys)).items()):
        out.sample("pollen_tasks_lost", [("worker", host), ("task", name)], count)

    pipe = c.redis.pipeline(transaction=False)
    for collector, _ in collectors:
        pipe.hmget(c.keys.collector(collector.decode()), *(f for f, _, _ in _COLLECTOR_FIGURES))
    health = await pipe.execute() if collectors else []
    out.family(
        "pollen_collector_heartbeat_age_seconds",
        "gauge",
        "Seconds since the collector last reported",
    )
    for collector, heartbeat in collectors:
        out.sample(
            "pollen_collector_heartbeat_age_seconds",
            [("collector", collector.decode())],
            max(0.0, now - float(heartbeat)),
        )
    for index, (_, metric, help_text) in enumerate(_COLLECTOR_FIGURES):
        out.family(metric, "counter" if metric.endswith("_total") else "gauge", help_text)
        for (collector, _), values in zip(collectors, health, strict=True):
            if values[index] is not None:
                out.sample(metric, [("collector", collector.decode())], float(values[index]))
    out.family("pollen_malformed_events_total", "counter", "Malformed events skipped, by reason")
    for reason, count in sorted(malformed.items()):
        out.sample("pollen_malformed_events_total", [("reason", reason.decode())], int(count))
    out.family("pollen_tasks", "gauge", "Tasks stored")
    out.sample("pollen_tasks", [], tasks_stored)
    out.family("pollen_queue_messages", "gauge", "Messages waiting in a queue (enabler sample)")
    samples = [msgspec.json.decode(raw) for raw in sorted(queues.values())]
    samples = [x for x in samples if isinstance(x, dict)]
    for sample in samples:
        if isinstance(sample.get("messages"), int | float):
            out.sample(
                "pollen_queue_messages", [("queue", str(sample.get("name")))], sample["messages"]
            )
    out.family(
        "pollen_queue_consumers",
        "gauge",
        "Consumers of a queue (enabler sample; RabbitMQ only, a Redis broker cannot tell)",
    )
    for sample in samples:
        if isinstance(sample.get("consumers"), int):
            out.sample(
                "pollen_queue_consumers", [("queue", str(sample.get("name")))], sample["consumers"]
            )
    out.family(
        "pollen_queue_oldest_message_age_seconds",
        "gauge",
        "Age of the oldest message waiting in a queue at the enabler's sample (Redis broker: "
        "from its task-sent event; RabbitMQ: its timestamp property, management API)",
    )
    for sample in samples:
        oldest = sample.get("oldest")
        if isinstance(oldest, dict) and isinstance(oldest.get("age"), int | float):
            out.sample(
                "pollen_queue_oldest_message_age_seconds",
                [("queue", str(sample.get("name")))],
                oldest["age"],
            )
    return out.text()


async def metrics(request: web.Request) -> web.Response:
    text = await render(ctx(request))
    return web.Response(
        text=text,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


routes = [web.get("/metrics", metrics, name="metrics")]
openapi_paths: Spec = {
    "/metrics": operation(
        "get",
        "Prometheus metrics (Flower's names plus pollen_*)",
        [],
        {"description": "text exposition format"},
        {},
    ),
}
