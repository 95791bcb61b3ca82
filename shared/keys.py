"""The Redis key layout: every key Pollen reads or writes is named here and nowhere else.

Keys start with the namespace (``POLLEN_NAMESPACE``). Task state is spread over N shards
(``POLLEN_SHARDS``); each shard's keys share one Redis Cluster hash tag, so the collector's
atomic update of a task, its indexes, counters and the event stream runs in one slot. Readers
merge the shards. Keys without a hash tag are single-key and live wherever the cluster puts them.

Per shard, with ``S = "<ns>:{<tag>}:"``:

===============================  ======  ==========================================================
key                              type    holds
===============================  ======  ==========================================================
S task:<uuid>                    hash    the task: celery's ``Task.as_dict()`` fields, each value
                                         JSON-encoded, absent when null; ``lost`` (true) and
                                         ``lost_at`` while marked lost; hidden merge state in
                                         fields starting with ``_`` (see ``apply_events.lua``)
S idx:ts                         zset    uuid by task ``timestamp`` (Flower's default order)
S idx:received / idx:started     zset    uuid by that time; ``-inf`` when the task has none
S idx:state:<STATE>              zset    uuid by ``timestamp``, tasks in that state
S idx:name:<name>                zset    uuid by ``timestamp``, tasks of that name
S idx:worker:<hostname>          zset    uuid by ``timestamp``, tasks last on that worker
S idx:sn:<STATE>:<name>          zset    state and name together
S idx:sw:<STATE>:<hostname>      zset    state and worker together (STARTED = executing now)
S children:<uuid>                set     children of task <uuid> that live in this shard
S names                          set     task names seen
S states                         set     task states seen (custom states included)
S worker:<hostname>              hash    worker fields from worker events (JSON values) and
                                         liveness: ``_hb`` last heartbeat (receive time),
                                         ``_hbts``/``_offts``/``_onts`` sender times of last
                                         beat/offline/online
S workers                        zset    hostnames of worker events by last heartbeat
S seen                           zset    hostname by latest task-event timestamp (celery counts
                                         a task event as a heartbeat of its worker)
S wdedup:<hostname>              zset    identities of recent worker events (duplicate filter)
S counts                         hash    ``<worker>\\x1f<event type>\\x1f<task name>`` -> count
S minute:<epoch minute>          hash    ``<task name>\\x1f<STATE>`` -> events that minute
S runtime                        hash    ``<worker>\\x1f<task name>\\x1f<bucket>`` -> count,
                                         buckets of ``RUNTIME_BUCKETS`` plus ``sum`` and ``count``
S rtminute:<epoch minute>        hash    ``<task name>\\x1f<bucket>`` -> task-succeeded events that
                                         minute, buckets of ``RUNTIME_BUCKETS`` (windowed
                                         percentiles)
S wait                           hash    ``<stage>\\x1f<queue>\\x1f<task name>\\x1f<bucket>``
                                         -> count, buckets of ``WAIT_BUCKETS`` (and ``+Inf``)
                                         plus ``sum``;
                                         stage ``queue`` (due -> received) or ``prefetch``
                                         (received or eta -> started), ``apply_events.lua``
S wtminute:<epoch minute>        hash    the same fields but sum, by the minute of the
                                         received (queue) or started (prefetch) event
S prefetch                       hash    ``<worker>\\x1f<task name>`` -> ``<timestamp>,<uuid>,
                                         <seconds>``: Flower's prefetch time, from the latest
                                         event (by timestamp, then uuid)
S deaths                         hash    hostname -> ``<t>,<t>...``: sender times, ascending, of
                                         the worker's deaths (its last word when found dead, a
                                         worker-online's), newest ``MAX_DEATHS``; the same in
                                         every shard
S idx:lost                       zset    uuid by ``timestamp``, tasks marked lost (a dead worker's
                                         RECEIVED/STARTED tasks, ``apply_events.lua``)
S lostcounts                     hash    ``<worker>\\x1f<task name>`` -> tasks marked lost
S idx:exc:<class>                zset    uuid by ``timestamp``, tasks with a task-failed or
                                         task-retried whose exception is of that class
S failures                       hash    ``<worker>\\x1f<class>\\x1f<task name>\\x1f<subject>``
                                         -> events; subject ``failed`` or ``retried``, class
                                         from ``events.exception_class``
S failminute:<epoch minute>      hash    ``<class>`` -> failed/retried events that minute
S failfirst / faillast           zset    exception class by the timestamp of its first/last
                                         failed or retried event
S stream                         stream  every applied event, normalized JSON in field ``e``,
                                         and ``task-lost`` when a task's mark changes
===============================  ======  ==========================================================

Global (no hash tag):

===============================  ======  ==========================================================
<ns>:events                      pubsub  one message per script call: a line ``<stream id> <entry>``
                                         per applied event (``events.published_events``)
<ns>:collector:<id>              hash    a collector's health: last event, rate, lag, errors
<ns>:collectors                  zset    collector ids by last heartbeat
<ns>:malformed                   hash    malformed events by reason (all collectors)
<ns>:malformed:sample:<reason>   string  the latest malformed sample for that reason
<ns>:inspect:<hostname>          hash    the enabler's inspect answers (JSON values): per method
                                         ``m`` (stats, active_queues, registered, conf, active,
                                         reserved, scheduled, revoked) the latest answer in ``m``,
                                         its time in ``m:time``, ``m:error`` =
                                         ``{"error", "time"}`` while the latest attempt failed;
                                         ``timestamp`` newest answer; expires after
                                         ``POLLEN_INSPECT_TTL`` without answers
<ns>:inspected                   zset    hostname by the time of its newest inspect answer
<ns>:queues                      hash    queue name -> JSON ``{"name", "messages", "consumers",
                                         "time", "oldest"}`` of the latest sample (consumers null
                                         on Redis; oldest: ``{"task_id", "since", "age"}`` of the
                                         oldest waiting message, or null when the broker cannot
                                         tell)
<ns>:queues:history              stream  id ``<minute start ms>-0``, field ``q`` -> JSON
                                         ``{queue: messages}``, first sample of each minute
<ns>:alerts:rules                hash    rule name -> JSON ``shared.alerts.Rule`` (the API's)
<ns>:alerts:state                hash    ``<rule>\\x1f<subject>`` -> JSON ``shared.alerts.Alert``,
                                         pending or firing (the active enabler's)
<ns>:alerts:log                  stream  field ``e`` -> JSON record: a firing, a resolution or a
                                         delivery attempt (``LOG_MAXLEN``)
<ns>:enabler:lease               string  id of the active enabler, PX expiry 1.5 enable intervals
<ns>:audit                       stream  control calls, field ``e`` -> JSON ``{"time", "who",
                                         "role", "action", "target", "params", "status",
                                         "sent", "reply"}``, a bulk action's ``task_ids`` (and
                                         ``new_task_ids``) too (``services/api/control/audit.py``)
===============================  ======  ==========================================================
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from functools import cached_property

#: Separator inside composite hash fields (worker, event type, task name...).
SEP = "\x1f"

#: Deaths kept per worker in each shard's ``deaths`` (its newest).
MAX_DEATHS = 16

#: Prometheus-style runtime histogram buckets (seconds), as prometheus_client's defaults
#: (Flower's ``flower_task_runtime_seconds`` uses them).
RUNTIME_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

#: Wait-time histogram buckets (seconds): from milliseconds to an hour, queues back up for long.
WAIT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

#: The waits a task's events measure (``wait`` hash, ``apply_events.lua``'s wait rule): in the
#: broker's queue (due -> received) and in the worker's prefetch (received or eta -> started).
WAIT_STAGES: tuple[str, ...] = ("queue", "prefetch")

CLUSTER_SLOTS = 16384


def _crc16(data: bytes) -> int:
    # Redis Cluster's key slot function is CRC16/XMODEM, which binascii.crc_hqx computes.
    return binascii.crc_hqx(data, 0)


def key_slot(key: str) -> int:
    """Redis Cluster's slot of ``key``, honouring ``{hash tags}``."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16(raw) % CLUSTER_SLOTS


def shard_tag(namespace: str, shard: int, shards: int) -> str:
    """The hash tag of ``shard``: chosen so the N shards fall in N evenly spaced slot ranges,
    which a cluster with N (or a divisor of N) equal masters places on different nodes."""
    if shards == 1:
        return namespace
    for suffix in range(100_000):
        tag = f"{namespace}.{shard}.{suffix}"
        if _crc16(tag.encode()) % CLUSTER_SLOTS * shards // CLUSTER_SLOTS == shard:
            return tag
    raise AssertionError("unreachable: CRC16 covers every slot range")


def shard_of(identity: str, shards: int) -> int:
    """Shard of a task (by uuid) or of a worker (by hostname)."""
    if shards == 1:
        return 0
    return binascii.crc32(identity.encode()) % shards


@dataclass(frozen=True)
class Suffixes:
    """What follows ``Shard.prefix`` in each per-shard key: the one spelling, read by ``Shard``
    and handed to the Lua scripts as ``KEY.<field>`` (``shared/scripts.py``). A suffix that
    ends in ``:`` is followed by the key's parameters."""

    task: str = "task:"
    idx_ts: str = "idx:ts"
    idx_received: str = "idx:received"
    idx_started: str = "idx:started"
    idx_state: str = "idx:state:"
    idx_name: str = "idx:name:"
    idx_worker: str = "idx:worker:"
    idx_sn: str = "idx:sn:"
    idx_sw: str = "idx:sw:"
    children: str = "children:"
    names: str = "names"
    states: str = "states"
    wdedup: str = "wdedup:"
    worker: str = "worker:"
    workers: str = "workers"
    seen: str = "seen"
    counts: str = "counts"
    minute: str = "minute:"
    runtime: str = "runtime"
    rtminute: str = "rtminute:"
    wait: str = "wait"
    wtminute: str = "wtminute:"
    prefetch: str = "prefetch"
    deaths: str = "deaths"
    idx_lost: str = "idx:lost"
    lostcounts: str = "lostcounts"
    idx_exc: str = "idx:exc:"
    failures: str = "failures"
    failminute: str = "failminute:"
    failfirst: str = "failfirst"
    faillast: str = "faillast"
    stream: str = "stream"


SUFFIXES = Suffixes()


@dataclass(frozen=True)
class Hidden:
    """The hidden fields of the task and worker hashes (``_``-prefixed: readers leave them
    out): the one spelling, read by Python readers and handed to the Lua scripts as
    ``HIDDEN.<field>``."""

    #: a task's raw state, name, worker and parent_id (what its index keys are made of)
    state: str = "_s"
    name: str = "_n"
    worker: str = "_w"
    parent: str = "_p"
    #: a task's sorted event history: ``_1`` .. ``_<N>``, N in ``history_len``
    history: str = "_"
    history_len: str = "_hn"
    #: a task's events counted before its name was known (moved under the name later)
    unnamed: str = "_u"
    #: a task's exception classes (of its failed and retried events), SEP-joined
    exceptions: str = "_x"
    #: a worker's newest heartbeat: receive time and sender timestamp; newest offline and
    #: online sender times
    heartbeat: str = "_hb"
    heartbeat_ts: str = "_hbts"
    offline_ts: str = "_offts"
    online_ts: str = "_onts"


HIDDEN = Hidden()


@dataclass(frozen=True)
class Shard:
    """Key names of one shard."""

    namespace: str
    index: int
    tag: str

    @cached_property
    def prefix(self) -> str:
        return f"{self.namespace}:{{{self.tag}}}:"

    def task(self, uuid: str) -> str:
        return f"{self.prefix}{SUFFIXES.task}{uuid}"

    @property
    def by_timestamp(self) -> str:
        return f"{self.prefix}{SUFFIXES.idx_ts}"

    @property
    def by_received(self) -> str:
        return f"{self.prefix}{SUFFIXES.idx_received}"

    @property
    def by_started(self) -> str:
        return f"{self.prefix}{SUFFIXES.idx_started}"

    def by_state(self, state: str) -> str:
        return f"{self.prefix}{SUFFIXES.idx_state}{state}"

    def by_name(self, name: str) -> str:
        return f"{self.prefix}{SUFFIXES.idx_name}{name}"

    def by_worker(self, hostname: str) -> str:
        return f"{self.prefix}{SUFFIXES.idx_worker}{hostname}"

    def by_state_name(self, state: str, name: str) -> str:
        return f"{self.prefix}{SUFFIXES.idx_sn}{state}:{name}"

    def by_state_worker(self, state: str, hostname: str) -> str:
        return f"{self.prefix}{SUFFIXES.idx_sw}{state}:{hostname}"

    def children(self, uuid: str) -> str:
        return f"{self.prefix}{SUFFIXES.children}{uuid}"

    @property
    def names(self) -> str:
        return f"{self.prefix}{SUFFIXES.names}"

    @property
    def states(self) -> str:
        return f"{self.prefix}{SUFFIXES.states}"

    def worker_dedup(self, hostname: str) -> str:
        return f"{self.prefix}{SUFFIXES.wdedup}{hostname}"

    def worker(self, hostname: str) -> str:
        return f"{self.prefix}{SUFFIXES.worker}{hostname}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}{SUFFIXES.workers}"

    @property
    def seen(self) -> str:
        return f"{self.prefix}{SUFFIXES.seen}"

    @property
    def counts(self) -> str:
        return f"{self.prefix}{SUFFIXES.counts}"

    def minute(self, epoch_minute: int) -> str:
        return f"{self.prefix}{SUFFIXES.minute}{epoch_minute}"

    @property
    def runtime(self) -> str:
        return f"{self.prefix}{SUFFIXES.runtime}"

    def runtime_minute(self, epoch_minute: int) -> str:
        return f"{self.prefix}{SUFFIXES.rtminute}{epoch_minute}"

    @property
    def wait(self) -> str:
        return f"{self.prefix}{SUFFIXES.wait}"

    def wait_minute(self, epoch_minute: int) -> str:
        return f"{self.prefix}{SUFFIXES.wtminute}{epoch_minute}"

    @property
    def prefetch(self) -> str:
        return f"{self.prefix}{SUFFIXES.prefetch}"

    @property
    def deaths(self) -> str:
        return f"{self.prefix}{SUFFIXES.deaths}"

    @property
    def lost(self) -> str:
        return f"{self.prefix}{SUFFIXES.idx_lost}"

    @property
    def lostcounts(self) -> str:
        return f"{self.prefix}{SUFFIXES.lostcounts}"

    def by_exception(self, exception_class: str) -> str:
        return f"{self.prefix}{SUFFIXES.idx_exc}{exception_class}"

    @property
    def failures(self) -> str:
        return f"{self.prefix}{SUFFIXES.failures}"

    def failure_minute(self, epoch_minute: int) -> str:
        return f"{self.prefix}{SUFFIXES.failminute}{epoch_minute}"

    @property
    def failures_first(self) -> str:
        return f"{self.prefix}{SUFFIXES.failfirst}"

    @property
    def failures_last(self) -> str:
        return f"{self.prefix}{SUFFIXES.faillast}"

    @property
    def stream(self) -> str:
        return f"{self.prefix}{SUFFIXES.stream}"


@dataclass(frozen=True)
class Keys:
    """Key names of one namespace: its shards and its global keys."""

    namespace: str
    shards: int = 1

    @cached_property
    def all_shards(self) -> tuple[Shard, ...]:
        return tuple(
            Shard(self.namespace, i, shard_tag(self.namespace, i, self.shards))
            for i in range(self.shards)
        )

    def shard_for(self, identity: str) -> Shard:
        return self.all_shards[shard_of(identity, self.shards)]

    @property
    def events_channel(self) -> str:
        return f"{self.namespace}:events"

    def collector(self, collector_id: str) -> str:
        return f"{self.namespace}:collector:{collector_id}"

    @property
    def collectors(self) -> str:
        return f"{self.namespace}:collectors"

    @property
    def malformed(self) -> str:
        return f"{self.namespace}:malformed"

    def malformed_sample(self, reason: str) -> str:
        return f"{self.namespace}:malformed:sample:{reason}"

    def inspect(self, hostname: str) -> str:
        return f"{self.namespace}:inspect:{hostname}"

    @property
    def inspected(self) -> str:
        return f"{self.namespace}:inspected"

    @property
    def queues(self) -> str:
        return f"{self.namespace}:queues"

    @property
    def queues_history(self) -> str:
        return f"{self.namespace}:queues:history"

    @property
    def enabler_lease(self) -> str:
        return f"{self.namespace}:enabler:lease"

    @property
    def audit(self) -> str:
        return f"{self.namespace}:audit"

    @property
    def alert_rules(self) -> str:
        return f"{self.namespace}:alerts:rules"

    @property
    def alert_state(self) -> str:
        return f"{self.namespace}:alerts:state"

    @property
    def alert_log(self) -> str:
        return f"{self.namespace}:alerts:log"
