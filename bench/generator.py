"""Synthetic Celery event traffic, published through celery's own ``EventDispatcher``.

Each simulated worker has its own dispatcher (its hostname, its Lamport clock, its channel) and
runs realistic task lifecycles with a few tasks in flight at once: ``task-received``,
``task-started``, then ``task-succeeded`` (90 %), ``task-failed`` (5 %) or ``task-retried``
followed by a second attempt (5 %). A client dispatcher sends ``task-sent`` first (as celery
does with ``task_send_sent_event=True``; always unbatched, as a client sends it). Every worker
sends ``worker-online``, a ``worker-heartbeat`` every 2 s and ``worker-offline``.

Unbatched: one message per event. Batched: the worker dispatchers buffer task events
(``buffer_group=['task']``, ``buffer_limit=24``) and publish ``task.multi`` messages with a JSON
list body, exactly as a celery worker does.

Full speed or a fixed rate (events/s over all processes); several processes when one cannot
push fast enough. ``python -m bench.generator --help``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery

NAMES = (
    "proj.tasks.add",
    "proj.tasks.send_email",
    "proj.billing.charge_card",
    "proj.reports.build_daily_report",
    "proj.images.make_thumbnail",
    "proj.sync.pull_orders",
    "proj.search.reindex_document",
    "proj.notify.push",
)
EXCEPTION = "ConnectionError('upstream timed out after 30.0s')"
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/.venv/lib/python3.12/site-packages/celery/app/trace.py", line 453, '
    "in trace_task\n    R = retval = fun(*args, **kwargs)\n"
    '  File "/app/proj/sync.py", line 88, in pull_orders\n'
    "    resp = session.get(url, timeout=30)\n"
    '  File "/app/.venv/lib/python3.12/site-packages/requests/sessions.py", line 602, in get\n'
    '    return self.request("GET", url, **kwargs)\n'
    "requests.exceptions.ConnectionError: upstream timed out after 30.0s\n"
)
HEARTBEAT_EVERY = 2.0
IN_FLIGHT = 4  # tasks a worker holds at once (prefetched + executing)
TIMER_FLUSH = 0.2  # a worker also flushes its buffer on a timer; rate mode only
PRECOMPUTE_TASKS = 300_000


@dataclass(frozen=True)
class GenConfig:
    broker: str
    tasks: int
    #: Events per second over all processes; 0 = full speed.
    rate: float = 0.0
    batched: bool = False
    procs: int = 1
    workers: int = 4
    sent_events: bool = True
    heartbeats: bool = True
    seed: int = 1
    #: Distinguishes runs in hostnames (e.g. several runs on one broker).
    tag: str = "bench"


@dataclass
class GenResult:
    task_events: int = 0
    worker_events: int = 0
    messages: int = 0
    tasks: int = 0
    seconds: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    procs: list[dict[str, float]] = field(default_factory=list)

    @property
    def events(self) -> int:
        return self.task_events + self.worker_events

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["events"] = self.events
        out["events_per_s"] = self.events / self.seconds if self.seconds else 0.0
        return out


Event = tuple[str, dict[str, Any]]  # (type, fields)


def lifecycle(rng: random.Random, task_id: str) -> list[Event]:
    """The worker-side events of one task, in the order a worker sends them."""
    name = NAMES[rng.randrange(len(NAMES))]
    args = f"({rng.randrange(10_000)}, '{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}')"
    kwargs = f"{{'priority': {rng.randrange(10)}, 'source': 'api'}}"
    received = {
        "uuid": task_id,
        "name": name,
        "args": args,
        "kwargs": kwargs,
        "root_id": task_id,
        "parent_id": None,
        "retries": 0,
        "eta": None,
        "expires": None,
    }
    started = {"uuid": task_id}
    roll = rng.random()
    events: list[Event] = [("task-received", received), ("task-started", started)]
    if roll < 0.05:
        events.append(
            ("task-failed", {"uuid": task_id, "exception": EXCEPTION, "traceback": TRACEBACK})
        )
        return events
    if roll < 0.10:
        events.append(
            ("task-retried", {"uuid": task_id, "exception": EXCEPTION, "traceback": TRACEBACK})
        )
        events.append(("task-received", {**received, "retries": 1}))
        events.append(("task-started", started))
    result = f"{{'ok': True, 'rows': {rng.randrange(1000)}}}"
    runtime = round(rng.lognormvariate(-2.5, 1.0), 6)
    events.append(("task-succeeded", {"uuid": task_id, "result": result, "runtime": runtime}))
    return events


def sent_fields(received: dict[str, Any]) -> dict[str, Any]:
    return {
        **received,
        "queue": "celery",
        "exchange": "",
        "routing_key": "celery",
    }


def worker_fields(active: int, processed: int) -> dict[str, Any]:
    return {
        "freq": HEARTBEAT_EVERY,
        "active": active,
        "processed": processed,
        "loadavg": [0.52, 0.61, 0.66],
        "sw_ident": "py-celery",
        "sw_ver": "5.7.0",
        "sw_sys": "Linux",
    }


def schedule(rng: random.Random, tasks: int, prefix: str) -> Iterator[tuple[int, Event]]:
    """(slot, event) for ``tasks`` tasks on one worker, IN_FLIGHT at a time, interleaved.

    Slot -1 is the client (task-sent), 0 the worker itself.
    """
    pending: list[list[Event]] = []
    started = 0
    while started < tasks or pending:
        while started < tasks and len(pending) < IN_FLIGHT:
            task_id = f"{prefix}-{started:08d}-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}"
            events = lifecycle(rng, task_id)
            yield -1, ("task-sent", sent_fields(events[0][1]))
            pending.append(events)
            started += 1
        i = rng.randrange(len(pending))
        events = pending[i]
        yield 0, events.pop(0)
        if not events:
            pending.pop(i)


def _interleave(
    schedules: list[Iterator[tuple[int, Event]]],
) -> Iterator[tuple[int, int, str, dict[str, Any]]]:
    """One event of each worker in turn, as concurrent workers' events reach the broker."""
    live = list(range(len(schedules)))
    while live:
        for k in list(live):
            try:
                slot, (kind, fields) = next(schedules[k])
            except StopIteration:
                live.remove(k)
                continue
            yield k, slot, kind, fields


def run_part(config: GenConfig, part: int, start_at: float) -> dict[str, float]:
    """One process: its share of the workers, the tasks and the rate."""
    from celery.events import EventDispatcher

    app = Celery("bench", broker=config.broker, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    rng = random.Random(config.seed * 1000 + part)
    my_workers = [w for w in range(config.workers) if w % config.procs == part] or [part]
    share = len(my_workers) / max(config.workers, config.procs)
    my_tasks = config.tasks * len(my_workers) // max(config.workers, 1)
    if part == config.procs - 1:
        # the remainder goes to the last part so the total is exact
        my_tasks = config.tasks - sum(
            config.tasks
            * len([w for w in range(config.workers) if w % config.procs == p])
            // max(config.workers, 1)
            for p in range(config.procs - 1)
        )
    rate = config.rate * share if config.rate else 0.0
    conn = app.connection_for_write()
    conn.ensure_connection(max_retries=10)
    buffer = ["task"] if config.batched else None
    dispatchers = []
    schedules = []
    per_worker = [my_tasks // len(my_workers)] * len(my_workers)
    per_worker[-1] += my_tasks - sum(per_worker)
    for n, w in enumerate(my_workers):
        hostname = f"celery@{config.tag}-w{w}"
        dispatchers.append(
            EventDispatcher(
                conn,
                hostname=hostname,
                app=app,
                buffer_group=buffer,
                buffer_limit=24,
                buffer_while_offline=False,
            )
        )
        schedules.append(schedule(rng, per_worker[n], f"{config.tag}{w}"))
    # Built before the clock starts (bounded in size), so the timed loop only publishes.
    merged = _interleave(schedules)
    stream: Iterable[tuple[int, int, str, dict[str, Any]]] = (
        list(merged) if my_tasks <= PRECOMPUTE_TASKS else merged
    )
    client = EventDispatcher(
        conn, hostname=f"client@{config.tag}-{part}", app=app, buffer_while_offline=False
    )
    task_events = worker_events = messages = 0
    processed = [0] * len(my_workers)
    for d in dispatchers:
        d.send("worker-online", **worker_fields(0, 0))
        worker_events += 1
        messages += 1
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.monotonic()
    next_beat = t0 + HEARTBEAT_EVERY
    next_flush = t0 + TIMER_FLUSH
    sent = 0
    for k, slot, kind, fields in stream:
        if slot == -1:
            if not config.sent_events:
                continue
            client.send(kind, **fields)
            messages += 1
        else:
            dispatchers[k].send(kind, **fields)
            if not config.batched:
                messages += 1
            elif len(dispatchers[k]._group_buffer["task"]) == 0:
                messages += 1  # the send just flushed a full buffer
            if kind in ("task-succeeded", "task-failed"):
                processed[k] += 1
        task_events += 1
        sent += 1
        if rate:
            due = t0 + sent / rate
            now = time.monotonic()
            if due - now > 0.002:
                time.sleep(due - now)
        if sent % 64:
            continue
        now = time.monotonic()
        if config.heartbeats and now >= next_beat:
            for k, d in enumerate(dispatchers):
                d.send("worker-heartbeat", **worker_fields(IN_FLIGHT, processed[k]))
                worker_events += 1
                messages += 1
            next_beat = now + HEARTBEAT_EVERY
        if config.batched and rate and now >= next_flush:
            for d in dispatchers:
                if d._group_buffer["task"]:
                    d.flush()
                    messages += 1
            next_flush = now + TIMER_FLUSH
    for d in dispatchers:
        if config.batched and d._group_buffer["task"]:
            messages += 1
        d.flush()
        d.send("worker-offline", **worker_fields(0, 0))
        worker_events += 1
        messages += 1
    elapsed = time.monotonic() - t0
    for d in [*dispatchers, client]:
        d.close()
    conn.release()
    return {
        "part": part,
        "task_events": task_events,
        "worker_events": worker_events,
        "messages": messages,
        "tasks": my_tasks,
        "seconds": elapsed,
        "finished": time.time(),
    }


def _child(config: GenConfig, part: int, start_at: float, out: Any) -> None:
    out.put(run_part(config, part, start_at))


def generate(config: GenConfig) -> GenResult:
    """Publish the whole stream; returns what was sent. Blocks until every process is done."""
    start_at = time.time() + (0.5 if config.procs == 1 else 2.0)
    if config.procs == 1:
        parts = [run_part(config, 0, start_at)]
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        children = [
            ctx.Process(target=_child, args=(config, p, start_at, queue))
            for p in range(config.procs)
        ]
        for c in children:
            c.start()
        parts = [queue.get(timeout=3600) for _ in children]
        for c in children:
            c.join(60)
            if c.exitcode != 0:
                raise RuntimeError(f"generator process exited with {c.exitcode}")
    result = GenResult(started=start_at, procs=parts)
    for p in parts:
        result.task_events += int(p["task_events"])
        result.worker_events += int(p["worker_events"])
        result.messages += int(p["messages"])
        result.tasks += int(p["tasks"])
    result.finished = max(p["finished"] for p in parts)
    result.seconds = max(p["seconds"] for p in parts)
    return result


def events_per_task(sent_events: bool = True) -> float:
    """Average task events per task of ``lifecycle`` (for sizing runs)."""
    # received, started, outcome; a retried task has 3 more; plus task-sent
    return 3 + 0.05 * 3 + (1 if sent_events else 0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", required=True, help="amqp://... or redis://...")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=0.0, help="events/s in total (0: full speed)")
    p.add_argument("--batched", action="store_true", help="task.multi bodies, as workers send")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--workers", type=int, default=4, help="simulated worker hostnames")
    p.add_argument("--no-sent", action="store_true", help="no task-sent events")
    p.add_argument("--no-heartbeats", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default=f"bench{os.getpid()}")
    a = p.parse_args(argv)
    config = GenConfig(
        broker=a.broker,
        tasks=a.tasks,
        rate=a.rate,
        batched=a.batched,
        procs=a.procs,
        workers=max(a.workers, a.procs),
        sent_events=not a.no_sent,
        heartbeats=not a.no_heartbeats,
        seed=a.seed,
        tag=a.tag,
    )
    result = generate(config)
    json.dump(result.as_dict(), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
