"""A task query as segments: which index zsets each walks, in which direction, and the filters
the zsets leave to check per task."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from services.api.query.search import NEVER, Known, implied, needs_known, parse_query, prefilter
from shared.keys import HIDDEN, Keys, Shard

#: Most values (names, states or workers) a search term may resolve to and still choose the
#: index walked (more would merge that many zsets; the term is then checked per task instead).
MAX_IMPLIED = 8

SORT_KEYS = ("name", "state", "received", "started")


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """A parsed ``/api/tasks`` request (filter values as given; matched case-insensitively)."""

    state: str | None = None
    name: str | None = None
    worker: str | None = None
    received: tuple[float, float] | None = None
    started: tuple[float, float] | None = None
    search: str = ""
    lost: bool = False
    #: an exception class (exact): tasks with a task-failed or task-retried of that class
    exception: str | None = None
    sort: str = ""
    desc: bool = True
    offset: int = 0
    limit: int = 100
    cursor: str | None = None

    def shape(self) -> bytes:
        """What a cursor is bound to: everything but offset, limit and the cursor."""
        parts = [
            self.state,
            self.name,
            self.worker,
            self.received,
            self.started,
            self.search,
            self.lost,
            self.exception,
            self.sort,
            self.desc,
        ]
        return hashlib.blake2b(msgspec.json.encode(parts), digest_size=8).digest()


@dataclass(slots=True)
class Segment:
    """Zsets (per shard) walked together in one direction, with the filters they leave."""

    key: list[Any]
    sources: list[tuple[Shard, str]]
    asc: bool
    lo: str = "-inf"
    hi: str = "+inf"
    filter: dict[str, Any] | None = None


def _score_text(value: float) -> str:
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return repr(value)


def _group_order(value: str | None) -> tuple[int, str, str]:
    # Flower sorts tasks without the value first, then by the casefolded value
    return (0, "", "") if value is None else (1, value.casefold(), value)


def _resolve(value: str | None, known: set[str]) -> tuple[str, ...] | None:
    """Known exact values equal to ``value`` casefolded (Flower matches filters that way)."""
    if not value:
        return None
    folded = value.casefold()
    return tuple(sorted(k for k in known if k.casefold() == folded))


def _narrow(
    values: tuple[str, ...] | None, implied: frozenset[str] | None
) -> tuple[str, ...] | None:
    """``values`` restricted to those a search requires, when that keeps few index keys."""
    if implied is None or len(implied) > MAX_IMPLIED:
        return values
    if values is None:
        return tuple(sorted(implied))
    return tuple(v for v in values if v in implied)


async def _members(
    client: Any, keys: Keys, key: Callable[[Shard], str], zset: bool = False
) -> set[str]:
    """The members of one set (or sorted set) over every shard."""
    pipe = client.pipeline(transaction=False)
    for shard in keys.all_shards:
        if zset:
            pipe.zrange(key(shard), 0, -1)
        else:
            pipe.smembers(key(shard))
    out: set[str] = set()
    for members in await pipe.execute():
        out.update(m.decode() for m in members)
    return out


async def task_names(client: Any, keys: Keys) -> list[str]:
    return sorted(await _members(client, keys, lambda s: s.names))


async def _has_nameless(client: Any, keys: Keys, names: Sequence[str]) -> bool:
    pipe = client.pipeline(transaction=False)
    for shard in keys.all_shards:
        pipe.zcard(shard.by_timestamp)
        for name in names:
            pipe.zcard(shard.by_name(name))
    counts = await pipe.execute()
    step = len(names) + 1
    return any(counts[i] > sum(counts[i + 1 : i + step]) for i in range(0, len(counts), step))


Values = tuple[str, ...] | None


def index(
    shards: Sequence[Shard],
    states: Values,
    names: Values,
    workers: Values,
    lost: bool = False,
    exception: str | None = None,
) -> tuple[list[tuple[Shard, str]], dict[str, Values]]:
    """The one choice of index: the zsets (per shard) holding exactly the tasks of the given
    states, names and workers, or the smallest superset of them, newest first; and the sets
    they leave for the walk to check per task. The composite indexes are state+name and
    state+worker; a name and a worker (without a state) walk the name's index. Lost tasks
    (few: a dead worker's unfinished ones) walk their own index, the rest checked per task,
    and so do the tasks of one exception class."""
    if exception is not None:
        sets = {"states": states, "names": names, "workers": workers}
        return [(s, s.by_exception(exception)) for s in shards], sets
    if lost:
        return [(s, s.lost) for s in shards], {"states": states, "names": names, "workers": workers}
    if states and names:
        keys = [(s, s.by_state_name(a, b)) for s in shards for a in states for b in names]
        return keys, {"workers": workers}
    if states and workers:
        return [(s, s.by_state_worker(a, b)) for s in shards for a in states for b in workers], {}
    if states:
        return [(s, s.by_state(a)) for s in shards for a in states], {"workers": workers}
    if names:
        return [(s, s.by_name(a)) for s in shards for a in names], {"workers": workers}
    if workers:
        return [(s, s.by_worker(a)) for s in shards for a in workers], {}
    return [(s, s.by_timestamp) for s in shards], {}


async def plan(client: Any, keys: Keys, q: TaskQuery) -> list[Segment] | None:
    """The segments of ``q`` in walk order; None when a filter matches nothing known."""
    expr = parse_query(q.search)
    searching = needs_known(expr)
    known_states: set[str] = set()
    known_names: set[str] = set()
    known_workers: set[str] = set()
    if q.state or q.sort == "state" or searching:
        known_states = await _members(client, keys, lambda s: s.states)
    if q.name or q.sort == "name" or searching:
        known_names = await _members(client, keys, lambda s: s.names)
    if q.worker or searching:
        known_workers = await _members(client, keys, lambda s: s.seen, zset=True)
    known = Known(frozenset(known_names), frozenset(known_states), frozenset(known_workers))
    pre = prefilter(expr, known)
    # name/state/worker terms the search requires narrow the indexes walked
    required = implied(pre)
    states = _narrow(_resolve(q.state, known_states), required.get(HIDDEN.state))
    names = _narrow(_resolve(q.name, known_names), required.get(HIDDEN.name))
    workers = _narrow(_resolve(q.worker, known_workers), required.get(HIDDEN.worker))
    if states == () or names == () or workers == () or pre == NEVER:
        return None
    shards = keys.all_shards

    def residual(
        sets: Mapping[str, Values],
        skip: str = "",
        walked_lost: bool = False,
        walked_exception: bool = False,
    ) -> dict[str, Any] | None:
        """The filters the walked zsets leave: value sets, time ranges (but the one a
        ``sort_by`` walks), lost and the exception class (unless their index is walked), the
        search prefilter; None when there are none."""
        f: dict[str, Any] = {k: dict.fromkeys(v, True) for k, v in sets.items() if v}
        if q.lost and not walked_lost:
            f["lost"] = True
        if q.exception is not None and not walked_exception:
            f["exceptions"] = {q.exception: True}
        for name, rng in (("received", q.received), ("started", q.started)):
            if rng is not None and name != skip:
                f[name] = [_score_text(rng[0]), _score_text(rng[1])]
        if pre is not None:
            f["search"] = pre
        return f or None

    def newest(key: list[Any], states: Values, names: Values, extra: dict[str, Any]) -> Segment:
        sources, left = index(shards, states, names, workers, q.lost, q.exception)
        walked = q.exception is not None
        f = residual(left, walked_lost=q.lost and not walked, walked_exception=walked) or {}
        return Segment(key, sources, asc=False, filter={**f, **extra} or None)

    if not q.sort:
        return [newest(["ts"], states, names, {})]
    if q.sort in ("received", "started"):
        rng = q.received if q.sort == "received" else q.started
        sources = [(s, s.by_received if q.sort == "received" else s.by_started) for s in shards]
        f = residual({"states": states, "names": names, "workers": workers}, skip=q.sort)
        asc = not q.desc
        if rng is None or rng[0] == -math.inf:
            hi = "+inf" if rng is None else _score_text(rng[1])
            return [Segment(["r", 0], sources, asc, "-inf", hi, f)]
        # tasks without the time score -inf: they form their own segment, first ascending
        none = Segment(["r", 0], sources, asc, "-inf", "-inf", f)
        some = Segment(["r", 1], sources, asc, _score_text(rng[0]), _score_text(rng[1]), f)
        return [none, some] if asc else [some, none]
    # sort_by name or state: one segment per group, newest first inside it
    groups: list[str | None]
    if q.sort == "name":
        groups = sorted(names or known_names, key=_group_order)
        if not names and await _has_nameless(client, keys, sorted(known_names)):
            groups.insert(0, None)
    else:
        groups = sorted(states or known_states, key=_group_order)
    if q.desc:
        groups.reverse()
    segments = []
    for group in groups:
        if q.sort == "state":
            segments.append(newest(["g", group], None if group is None else (group,), names, {}))
        elif group is None:  # tasks whose name is not known (yet)
            segments.append(newest(["g", None], states, None, {"noname": True}))
        else:
            segments.append(newest(["g", group], states, (group,), {}))
    return segments
