"""Apply decoded events to Redis: one ``apply_events.lua`` call per shard per batch."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.cluster
from msgspec import UNSET

from services.collector.decode import Decoded
from shared import apply_events
from shared import events as ev
from shared.keys import RUNTIME_BUCKETS, Keys, Shard
from shared.settings import Settings

_json = msgspec.json.encode
_pack = msgspec.msgpack.encode

#: celery's merge rule keeps only these fields of a task-received (Task.merge_rules).
RECEIVED_FIELDS = ("name", "args", "kwargs", "parent_id", "root_id", "retries", "eta", "expires")
_BUCKET_LABELS = [repr(b) for b in RUNTIME_BUCKETS]


#: Longest wait of one ``WAIT`` for the replicas (``POLLEN_REDIS_WAIT_REPLICAS``), in ms.
WAIT_TIMEOUT_MS = 2000


class NotReplicated(redis.exceptions.ConnectionError):
    """Fewer replicas than ``POLLEN_REDIS_WAIT_REPLICAS`` confirmed a batch: it is treated as
    not written (an outage), so it is applied again and not acknowledged until they do."""


@dataclass(slots=True)
class Prepared:
    """A batch ready for Redis: one ``(shard, config, events)`` script call per shard."""

    calls: list[tuple[Shard, bytes, bytes]]
    events: int
    #: Newest sender timestamp in the batch (for the lag figure).
    newest: float


@dataclass(slots=True)
class Applied:
    applied: int = 0
    duplicates: int = 0
    evicted: int = 0


def _text(value: Any) -> str:
    return _json(value).decode()


def task_args(
    event: ev.TaskEvent, open_json: bytes, held: dict[str, bytes] | None = None
) -> dict[str, Any]:
    """The Lua-side description of a task event (see the header of apply_events.lua)."""
    kind = ev.event_type(event)
    subject = kind[5:]
    names = RECEIVED_FIELDS if subject == "received" else ev.TASK_EVENT_FIELDS
    fields = {}
    for name in names:
        value = getattr(event, name)
        if value is not UNSET:
            fields[name] = _text(value)
    args: dict[str, Any] = {
        "kind": "task",
        "uuid": event.uuid,
        "uuid_json": _text(event.uuid),
        "subject": subject,
        "timestamp_json": _text(event.timestamp),
        "clock_json": str(event.clock),
        "hostname": event.hostname,
        "hostname_json": _text(event.hostname),
        "fields": fields,
        "open_json": open_json.decode(),
    }
    if "name" in fields and isinstance(event.name, str):
        args["name"] = event.name
    if "parent_id" in fields and isinstance(event.parent_id, str):
        args["parent_id"] = event.parent_id
    if "queue" in fields and isinstance(event.queue, str):
        args["queue"] = event.queue
    if subject in ("sent", "received"):
        if isinstance(event.retries, int):
            args["retries"] = str(event.retries)
        eta = ev.eta_timestamp(event.eta)
        if eta is not None:
            args["eta_ts"] = repr(eta)
    if subject == "succeeded" and isinstance(event.runtime, float | int):
        runtime = float(event.runtime)
        i = bisect.bisect_left(RUNTIME_BUCKETS, runtime)
        args["runtime_bucket"] = _BUCKET_LABELS[i] if i < len(RUNTIME_BUCKETS) else "+Inf"
        args["runtime_json"] = _text(runtime)
    if subject in ("failed", "retried"):
        exception = event.exception
        if exception is UNSET and held and "exception" in held:
            # held back for redaction by the task's name: its class is no secret
            exception = msgspec.json.decode(held["exception"])
        exc_class = ev.exception_class(exception)
        if exc_class is not None:
            args["exc_class"] = exc_class
    if held:
        args["held"] = {k: v.decode() for k, v in held.items()}
    return args


def worker_args(event: ev.WorkerEvent, open_json: bytes, local_received: float) -> dict[str, Any]:
    """The Lua-side description of a worker event (see the header of apply_events.lua)."""
    fields = {}
    for name in ev.WORKER_EVENT_FIELDS:
        value = getattr(event, name)
        if value is not UNSET:
            fields[name] = _text(value)
    return {
        "kind": "worker",
        "hostname": event.hostname,
        "subject": ev.event_type(event)[7:],
        "timestamp_json": _text(event.timestamp),
        "clock_json": str(event.clock),
        "local_received_json": _text(local_received),
        "fields": fields,
        "open_json": open_json.decode(),
    }


class Writer:
    def __init__(self, client: Any, settings: Settings) -> None:
        self.client = client
        self.keys = Keys(settings.namespace, settings.shards)
        self.settings = settings
        self.script = apply_events.register(client)
        self.cluster = isinstance(client, redis.cluster.RedisCluster)

    def config(self, now: float, age_check: bool) -> bytes:
        return apply_events.config(self.settings, self.keys, now, age_check)

    def prepare(self, batch: list[Decoded], now: float, age_check: bool = False) -> Prepared:
        """The script calls for ``batch``: pure Python, so it can overlap the previous batch's
        Redis work."""
        per_shard: dict[int, list[dict[str, Any]]] = {}
        newest = 0.0
        for item in batch:
            event = item.event
            if event.timestamp > newest:
                newest = event.timestamp
            if isinstance(event, ev.TaskEvent):
                identity = event.uuid
                args = task_args(event, item.open_json, item.held)
            else:
                identity = event.hostname
                args = worker_args(event, item.open_json, item.local_received)
            per_shard.setdefault(self.keys.shard_for(identity).index, []).append(args)
        if age_check:
            for each in self.keys.all_shards:
                per_shard.setdefault(each.index, [])
        config = self.config(now, age_check)
        calls = [
            (self.keys.all_shards[index], config, _pack(items))
            for index, items in per_shard.items()
        ]
        return Prepared(calls, len(batch), newest)

    def execute(self, prepared: Prepared) -> Applied:
        """Run the prepared calls, atomically per shard; raises on Redis errors (then the whole
        batch may be executed again: applying an event twice changes nothing)."""
        total = Applied()
        if not prepared.calls:
            return total
        if self.cluster:
            # redis-py refuses EVALSHA in cluster pipelines: one call per shard (per node)
            results = [
                self.script(keys=[shard.stream], args=[shard.prefix, config, packed])
                for shard, config, packed in prepared.calls
            ]
        else:
            pipe = self.client.pipeline(transaction=False)
            for shard, config, packed in prepared.calls:
                self.script(keys=[shard.stream], args=[shard.prefix, config, packed], client=pipe)
            wanted = self.settings.redis_wait_replicas
            if wanted:
                # on the same connection as the writes, so it waits for exactly them
                pipe.execute_command("WAIT", wanted, WAIT_TIMEOUT_MS)
            results = pipe.execute()
            if wanted:
                confirmed = int(results.pop())
                if confirmed < wanted:
                    raise NotReplicated(f"{confirmed} of {wanted} replicas confirmed a batch")
        for applied, duplicates, evicted in results:
            total.applied += applied
            total.duplicates += duplicates
            total.evicted += evicted
        return total

    def apply(self, batch: list[Decoded], now: float, age_check: bool = False) -> Applied:
        """``prepare`` then ``execute``."""
        return self.execute(self.prepare(batch, now, age_check))
