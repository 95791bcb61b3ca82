"""The task query engine behind ``/api/tasks``: pick the index that covers the filters and the
sort, walk it in ``query_tasks.lua`` chunks, merge the shards.

A query becomes a list of *segments* walked in order. A segment is one or more index zsets per
shard, all read in the same direction and merged by (score, member), plus the residual filters
the zsets do not cover, evaluated in Lua. The default order is Flower's: timestamp descending,
uuid descending on ties (``ZREVRANGE`` of ``idx:ts``). Sorting by received/started walks
``idx:received``/``idx:started``, where tasks without that time score ``-inf`` and so come first
ascending, as in Flower. Sorting by name or state walks the groups (names or states, ordered by
their casefolded value) and, inside a group, newest first: Flower orders a group by uuid.

Scans are bounded: filtered walks examine at most ``POLLEN_SEARCH_SCAN_LIMIT`` entries per
request, in chunks (one Lua call each, bounded in entries and in time), and report how many
they examined.
With several shards each page is a k-way merge of per-shard pages, never a scan.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.api import search as search_mod
from services.api.errors import bad_param
from shared.keys import Keys, Shard

#: Most entries one Lua call examines, and the time after which it stops examining: each call
#: holds Redis for a few milliseconds at most, however costly an entry is to check.
CHUNK = 10_000
CHUNK_USEC = 4000
#: Most matches one Lua call returns.
MAX_WANT = 5000
#: Most values (names, states or workers) a search term may resolve to and still choose the
#: index walked (more would merge that many zsets; the term is then checked per task instead).
MAX_IMPLIED = 8

SORT_KEYS = ("name", "state", "received", "started")
_pack = msgspec.msgpack.encode


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """A parsed ``/api/tasks`` request (filter values as given; matched case-insensitively)."""

    state: str | None = None
    name: str | None = None
    worker: str | None = None
    received: tuple[float, float] | None = None
    started: tuple[float, float] | None = None
    search: str = ""
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
            self.sort,
            self.desc,
        ]
        return hashlib.blake2b(msgspec.json.encode(parts), digest_size=8).digest()


class CursorData(msgspec.Struct, array_like=True):
    v: int
    shape: bytes
    segment: list[Any]
    score: str
    member: bytes


def encode_cursor(data: CursorData) -> str:
    return base64.urlsafe_b64encode(_pack(data)).rstrip(b"=").decode()


def decode_cursor(text: str, shape: bytes) -> CursorData:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = msgspec.msgpack.decode(raw, type=CursorData)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise bad_param("cursor", "not a cursor returned by this API") from None
    if data.v != 1:
        raise bad_param("cursor", "unsupported cursor version")
    if data.shape != shape:
        raise bad_param("cursor", "was returned for a different query (filters, search or sort)")
    try:
        score = float(data.score)
    except ValueError:
        score = math.nan
    if math.isnan(score) or len(data.member) > 512:
        raise bad_param("cursor", "not a cursor returned by this API")
    return data


@dataclass(slots=True)
class Segment:
    """Zsets (per shard) walked together in one direction, with the filters they leave."""

    key: list[Any]
    sources: list[tuple[Shard, str]]
    asc: bool
    lo: str = "-inf"
    hi: str = "+inf"
    filter: dict[str, Any] | None = None


@dataclass(slots=True)
class Page:
    uuids: list[str] = field(default_factory=list)
    examined: int = 0
    capped: bool = False
    next_cursor: str | None = None


@dataclass(slots=True)
class _Budget:
    """What one query may still do: entries to examine (or skip) and time (monotonic)."""

    remaining: int
    deadline: float
    #: False once the client is gone: its query stops (cancellation alone did not always
    #: reach a busy scan in time)
    wanted: Callable[[], bool] = lambda: True
    examined: int = 0
    capped: bool = False

    def spent(self) -> bool:
        """True (and the page marked capped) once the entries or the time are used up, or
        nobody waits for the answer any more."""
        if self.remaining <= 0 or time.monotonic() >= self.deadline or not self.wanted():
            self.capped = True
        return self.capped


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


class QueryEngine:
    def __init__(
        self, client: Any, keys: Keys, script: Any, scan_limit: int, time_limit: float = 5.0
    ) -> None:
        self.client = client
        self.keys = keys
        self.script = script
        self.scan_limit = scan_limit
        self.time_limit = time_limit

    async def _members(self, key: Callable[[Shard], str], zset: bool = False) -> set[str]:
        """The members of one set (or sorted set) over every shard."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.all_shards:
            if zset:
                pipe.zrange(key(shard), 0, -1)
            else:
                pipe.smembers(key(shard))
        out: set[str] = set()
        for members in await pipe.execute():
            out.update(m.decode() for m in members)
        return out

    async def task_names(self) -> list[str]:
        return sorted(await self._members(lambda s: s.names))

    async def _has_nameless(self, names: Sequence[str]) -> bool:
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.all_shards:
            pipe.zcard(shard.by_timestamp)
            for name in names:
                pipe.zcard(shard.by_name(name))
        counts = await pipe.execute()
        step = len(names) + 1
        return any(counts[i] > sum(counts[i + 1 : i + step]) for i in range(0, len(counts), step))

    async def plan(self, q: TaskQuery) -> list[Segment] | None:
        """The segments of ``q`` in walk order; None when a filter matches nothing known."""
        expr = search_mod.parse_query(q.search)
        searching = search_mod.needs_known(expr)
        known_states: set[str] = set()
        known_names: set[str] = set()
        known_workers: set[str] = set()
        if q.state or q.sort == "state" or searching:
            known_states = await self._members(lambda s: s.states)
        if q.name or q.sort == "name" or searching:
            known_names = await self._members(lambda s: s.names)
        if q.worker or searching:
            known_workers = await self._members(lambda s: s.seen, zset=True)
        known = search_mod.Known(
            frozenset(known_names), frozenset(known_states), frozenset(known_workers)
        )
        pre = search_mod.prefilter(expr, known)
        # name/state/worker terms the search requires narrow the indexes walked
        implied = search_mod.implied(pre)
        states = _narrow(_resolve(q.state, known_states), implied.get("_s"))
        names = _narrow(_resolve(q.name, known_names), implied.get("_n"))
        workers = _narrow(_resolve(q.worker, known_workers), implied.get("_w"))
        if states == () or names == () or workers == () or pre == search_mod.NEVER:
            return None
        shards = self.keys.all_shards

        def residual(**sets: tuple[str, ...] | None) -> dict[str, Any]:
            f: dict[str, Any] = {k: dict.fromkeys(v, True) for k, v in sets.items() if v}
            if q.received is not None:
                f["received"] = [_score_text(q.received[0]), _score_text(q.received[1])]
            if q.started is not None:
                f["started"] = [_score_text(q.started[0]), _score_text(q.started[1])]
            if pre is not None:
                f["search"] = pre
            return f

        def finish(f: dict[str, Any]) -> dict[str, Any] | None:
            return f or None

        segments: list[Segment] = []
        if q.sort in ("", None):
            if states and names:
                keys = [(s, s.by_state_name(a, b)) for s in shards for a in states for b in names]
                f = residual(workers=workers)
            elif states and workers:
                keys = [
                    (s, s.by_state_worker(a, b)) for s in shards for a in states for b in workers
                ]
                f = residual()
            elif states:
                keys = [(s, s.by_state(a)) for s in shards for a in states]
                f = residual()
            elif names:
                keys = [(s, s.by_name(a)) for s in shards for a in names]
                f = residual(workers=workers)
            elif workers:
                keys = [(s, s.by_worker(a)) for s in shards for a in workers]
                f = residual()
            else:
                keys = [(s, s.by_timestamp) for s in shards]
                f = residual()
            segments.append(Segment(["ts"], keys, asc=False, filter=finish(f)))
        elif q.sort in ("received", "started"):
            rng = q.received if q.sort == "received" else q.started
            f = residual(states=states, names=names, workers=workers)
            f.pop(q.sort, None)
            keys = [(s, s.by_received if q.sort == "received" else s.by_started) for s in shards]
            asc = not q.desc
            if rng is None or rng[0] == -math.inf:
                hi = "+inf" if rng is None else _score_text(rng[1])
                segments.append(Segment(["r", 0], keys, asc, "-inf", hi, finish(f)))
            else:
                none = Segment(["r", 0], keys, asc, "-inf", "-inf", finish(f))
                some = Segment(
                    ["r", 1], keys, asc, _score_text(rng[0]), _score_text(rng[1]), finish(f)
                )
                segments.extend([none, some] if asc else [some, none])
        elif q.sort == "name":
            groups: list[str | None] = sorted(names or known_names, key=_group_order)
            if not names and await self._has_nameless(sorted(known_names)):
                groups.insert(0, None)
            if q.desc:
                groups.reverse()
            for name in groups:
                if name is None:
                    if states:
                        keys = [(s, s.by_state(a)) for s in shards for a in states]
                        f = residual(workers=workers)
                    elif workers:
                        keys = [(s, s.by_worker(a)) for s in shards for a in workers]
                        f = residual()
                    else:
                        keys = [(s, s.by_timestamp) for s in shards]
                        f = residual()
                    f["noname"] = True
                elif states:
                    keys = [(s, s.by_state_name(a, name)) for s in shards for a in states]
                    f = residual(workers=workers)
                else:
                    keys = [(s, s.by_name(name)) for s in shards]
                    f = residual(workers=workers)
                segments.append(Segment(["g", name], keys, asc=False, filter=finish(f)))
        elif q.sort == "state":
            sgroups = sorted(states or known_states, key=_group_order)
            if q.desc:
                sgroups.reverse()
            for state in sgroups:
                if names:
                    keys = [(s, s.by_state_name(state, b)) for s in shards for b in names]
                    f = residual(workers=workers)
                elif workers:
                    keys = [(s, s.by_state_worker(state, b)) for s in shards for b in workers]
                    f = residual()
                else:
                    keys = [(s, s.by_state(state)) for s in shards]
                    f = residual()
                segments.append(Segment(["g", state], keys, asc=False, filter=finish(f)))
        return segments

    async def run(self, q: TaskQuery, wanted: Callable[[], bool] = lambda: True) -> Page:
        cursor = decode_cursor(q.cursor, q.shape()) if q.cursor else None
        segments = await self.plan(q)
        page = Page()
        if not segments or q.limit <= 0:
            return page
        start, after = 0, None
        if cursor is not None:
            start, after = self._resume_at(q, segments, cursor)
        expr = search_mod.parse_query(q.search)
        budget = _Budget(self.scan_limit, time.monotonic() + self.time_limit, wanted)
        skip = q.offset
        if skip and after is None:
            start, skip = await self._skip_whole(segments, start, skip)
        out: list[str] = []
        last: tuple[list[Any], str, bytes] | None = None
        for index in range(start, len(segments)):
            seg = segments[index]
            seg_after = after if index == start else None
            got, skip = await self._walk(seg, seg_after, skip, q.limit - len(out), expr, budget)
            for score_text, member in got:
                out.append(member.decode())
                last = (seg.key, score_text, member)
            if len(out) >= q.limit or budget.capped or budget.spent():
                break
        page.uuids = out
        page.examined = budget.examined
        page.capped = budget.capped
        if last is not None and len(out) >= q.limit:
            page.next_cursor = encode_cursor(CursorData(1, q.shape(), last[0], last[1], last[2]))
        return page

    async def _skip_whole(self, segments: list[Segment], start: int, skip: int) -> tuple[int, int]:
        """Skip the unfiltered segments (groups of ``sort_by=name/state``) that the offset
        covers whole by their sizes, one pipeline of ZCARDs, instead of one walk each."""
        whole: list[Segment] = []
        for seg in segments[start:]:
            if seg.filter is not None or (seg.lo, seg.hi) != ("-inf", "+inf"):
                break
            whole.append(seg)
        if len(whole) < 2:
            return start, skip
        pipe = self.client.pipeline(transaction=False)
        for seg in whole:
            for _, key in seg.sources:
                pipe.zcard(key)
        sizes = iter(await pipe.execute())
        for seg in whole:
            size = sum(next(sizes) for _ in seg.sources)
            if size > skip:
                break
            skip -= size
            start += 1
        return start, skip

    def _resume_at(
        self, q: TaskQuery, segments: list[Segment], cursor: CursorData
    ) -> tuple[int, tuple[str, bytes] | None]:
        for i, seg in enumerate(segments):
            if seg.key == cursor.segment:
                return i, (cursor.score, cursor.member)
        if cursor.segment and cursor.segment[0] == "g" and len(cursor.segment) == 2:
            # the cursor's group is gone: continue with the first group after it
            mark = _group_order(cursor.segment[1])
            for i, seg in enumerate(segments):
                here = _group_order(seg.key[1])
                if (here < mark) if q.desc else (here > mark):
                    return i, None
            return len(segments), None
        raise bad_param("cursor", "does not fit this query")

    async def _walk(
        self,
        seg: Segment,
        after: tuple[str, bytes] | None,
        skip: int,
        want: int,
        expr: search_mod.Expr,
        budget: _Budget,
    ) -> tuple[list[tuple[str, bytes]], int]:
        """Up to ``want`` matches of ``seg`` after dropping ``skip``; the skip left over."""
        searching = seg.filter is not None and "search" in seg.filter
        single = len(seg.sources) == 1 and not searching
        streams = [
            _Stream(self, shard, key, seg, after, skip if single else 0)
            for shard, key in seg.sources
        ]
        out: list[tuple[str, bytes]] = []
        while len(out) < want:
            need = min(MAX_WANT, want - len(out) + (0 if single else skip))
            empty = [s for s in streams if not s.buf and not s.done]
            if empty:
                await asyncio.gather(*(s.fill(need, expr, budget) for s in empty))
            live = [s for s in streams if s.buf]
            if not live:
                break
            if seg.asc:
                best = min(live, key=lambda s: (s.buf[0][0], s.buf[0][2]))
            else:
                best = max(live, key=lambda s: (s.buf[0][0], s.buf[0][2]))
            _, score_text, member = best.buf.popleft()
            if skip > 0 and not single:
                # an offset skipped here (several shards) is work like a scan: budgeted
                skip -= 1
                budget.remaining -= 1
                budget.examined += 1
                if budget.spent():
                    break
                continue
            out.append((score_text, member))
        if single:
            skip = streams[0].skip
        return out, skip


class _Stream:
    """One zset of one shard, read lazily through query_tasks.lua."""

    def __init__(
        self,
        engine: QueryEngine,
        shard: Shard,
        key: str,
        seg: Segment,
        after: tuple[str, bytes] | None,
        skip: int,
    ) -> None:
        self.engine = engine
        self.shard = shard
        self.key = key
        self.seg = seg
        self.after = after
        self.skip = skip
        self.buf: deque[tuple[float, str, bytes]] = deque()
        self.done = False

    async def fill(self, want: int, expr: search_mod.Expr, budget: _Budget) -> None:
        filtered = self.seg.filter is not None
        while not self.buf and not self.done:
            if (filtered or self.skip or not budget.wanted()) and budget.spent():
                self.done = True
                return
            request = {
                "asc": self.seg.asc,
                "min": self.seg.lo,
                "max": self.seg.hi,
                "after": [self.after[0], self.after[1].decode()] if self.after else None,
                "skip": self.skip,
                "want": max(1, want),
                "budget": min(CHUNK, budget.remaining) if filtered else 0,
                "usec": CHUNK_USEC,
                "filter": self.seg.filter,
            }
            res = await self.engine.script(
                keys=[self.key], args=[self.shard.prefix, _pack(request)]
            )
            flat, examined, done, last_score, last_member, skip_left = res
            budget.remaining -= examined
            budget.examined += examined
            self.skip = int(skip_left)
            self.done = bool(done)
            if last_score:
                self.after = (last_score.decode(), last_member)
            unsure: list[int] = []
            items: list[tuple[float, str, bytes]] = []
            for i in range(0, len(flat), 3):
                text = flat[i + 1].decode()
                items.append((float(text), text, flat[i]))
                if flat[i + 2] == 0:
                    unsure.append(len(items) - 1)
            if unsure:
                verdict = await self._verify([items[i][2] for i in unsure], expr)
                rejected = {i for i, ok in zip(unsure, verdict, strict=True) if not ok}
                items = [it for i, it in enumerate(items) if i not in rejected]
            self.buf.extend(items)

    async def _verify(self, members: list[bytes], expr: search_mod.Expr) -> list[bool]:
        """Flower's exact search semantics for the tasks Lua could not decide."""
        pipe = self.engine.client.pipeline(transaction=False)
        for m in members:
            pipe.hmget(self.shard.task(m.decode()), "_n", "_s", "_w", "args", "kwargs", "result")
        out = []
        for m, (n, s, w, args, kwargs, result) in zip(members, await pipe.execute(), strict=True):
            doc = search_mod.Document.of(
                m.decode(),
                n.decode() if n else None,
                s.decode() if s else None,
                w.decode() if w else None,
                _json(args),
                _json(kwargs),
                _json(result),
            )
            out.append(search_mod.matches(expr, doc))
        return out


def _json(raw: bytes | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)
