"""The engine: a plan's segments walked in ``query_tasks.lua`` chunks within a budget of entries
and time, the shards merged page by page, the search verified where Lua could not decide."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.api.query.cursor import CursorData, CursorError, decode_cursor, encode_cursor
from services.api.query.plan import Segment, TaskQuery, _group_order, plan, task_names
from services.api.query.search import TEXT_FIELDS, Document, Expr, matches, parse_query
from shared.keys import HIDDEN, Keys, Shard

#: Most entries one Lua call examines, and the time after which it stops examining: each call
#: holds Redis for a few milliseconds at most, however costly an entry is to check.
CHUNK = 10_000
CHUNK_USEC = 4000
#: Most matches one Lua call returns.
MAX_WANT = 5000
_pack = msgspec.msgpack.encode
#: ``_walk``'s mark for a segment walked to its end in every shard
_FINISHED: Any = object()


@dataclass(slots=True, frozen=True)
class Position:
    """Where a walk stands: its segment (by key), the last entry passed in it (None: the
    segment's start) and the offset still to skip from there. Every entry up to it, in walk
    order, was returned, skipped or rejected."""

    segment: list[Any]
    after: tuple[str, bytes] | None
    skip: int = 0


@dataclass(slots=True)
class Page:
    uuids: list[str] = field(default_factory=list)
    examined: int = 0
    capped: bool = False
    next_cursor: str | None = None
    #: where the walk goes on after this page (None: the query has no more), also after a page
    #: cut short by the budget, which a cursor does not resume (export walks on from there)
    resume: Position | None = None


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


class QueryEngine:
    def __init__(
        self, client: Any, keys: Keys, script: Any, scan_limit: int, time_limit: float = 5.0
    ) -> None:
        self.client = client
        self.keys = keys
        self.script = script
        self.scan_limit = scan_limit
        self.time_limit = time_limit

    async def task_names(self) -> list[str]:
        return await task_names(self.client, self.keys)

    async def plan(self, q: TaskQuery) -> list[Segment] | None:
        return await plan(self.client, self.keys, q)

    async def run(
        self, q: TaskQuery, wanted: Callable[[], bool] = lambda: True, at: Position | None = None
    ) -> Page:
        """One page of ``q``, from ``at`` (a previous page's ``resume``) or from its cursor."""
        if at is None and q.cursor:
            cursor = decode_cursor(q.cursor, q.shape())
            at = Position(cursor.segment, (cursor.score, cursor.member), q.offset)
        segments = await self.plan(q)
        page = Page()
        if not segments or q.limit <= 0:
            return page
        start, after = 0, None
        if at is not None:
            start, after = self._resume_at(q, segments, at)
        expr = parse_query(q.search)
        budget = _Budget(self.scan_limit, time.monotonic() + self.time_limit, wanted)
        skip = q.offset if at is None else at.skip
        if skip and after is None:
            start, skip = await self._skip_whole(segments, start, skip)
        out: list[str] = []
        last: tuple[list[Any], str, bytes] | None = None
        for index in range(start, len(segments)):
            seg = segments[index]
            seg_after = after if index == start else None
            got, skip, held = await self._walk(
                seg, seg_after, skip, q.limit - len(out), expr, budget
            )
            for score_text, member in got:
                out.append(member.decode())
                last = (seg.key, score_text, member)
            if len(out) >= q.limit:
                assert last is not None
                page.resume = Position(last[0], (last[1], last[2]))
                break
            if budget.capped or budget.spent():
                if held is not _FINISHED:
                    page.resume = Position(seg.key, held, skip)
                elif index + 1 < len(segments):
                    page.resume = Position(segments[index + 1].key, None, skip)
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
        self, q: TaskQuery, segments: list[Segment], at: Position
    ) -> tuple[int, tuple[str, bytes] | None]:
        for i, seg in enumerate(segments):
            if seg.key == at.segment:
                return i, at.after
        if at.segment and at.segment[0] == "g" and len(at.segment) == 2:
            # the position's group is gone: continue with the first group after it
            mark = _group_order(at.segment[1])
            for i, seg in enumerate(segments):
                here = _group_order(seg.key[1])
                if (here < mark) if q.desc else (here > mark):
                    return i, None
            return len(segments), None
        raise CursorError("does not fit this query")

    async def _walk(
        self,
        seg: Segment,
        after: tuple[str, bytes] | None,
        skip: int,
        want: int,
        expr: Expr,
        budget: _Budget,
    ) -> tuple[list[tuple[str, bytes]], int, Any]:
        """Up to ``want`` matches of ``seg`` after dropping ``skip``; the skip left over; and
        where the segment was left: ``_FINISHED``, or the entry every shard's walk has passed
        (None: the segment's start), from which a walk cut short by the budget goes on."""
        searching = seg.filter is not None and "search" in seg.filter
        single = len(seg.sources) == 1 and not searching
        streams = [
            _Stream(self, shard, key, seg, after, skip if single else 0)
            for shard, key in seg.sources
        ]
        out: list[tuple[str, bytes]] = []
        popped: tuple[str, bytes] | None = None
        skipped: deque[tuple[str, bytes]] = deque()  # where the merge skipped, in order
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
            popped = (score_text, member)
            if skip > 0 and not single:
                skipped.append(popped)
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
        # how far each shard's walk has gone: a shard still holding entries has gone up to the
        # last entry the merge took (the skip ran out of budget: the rest is decided, not
        # taken); one stopped by the budget, up to the last entry it examined
        passed = [s.after or after for s in streams if not s.buf and not s.exhausted]
        if any(s.buf for s in streams):
            passed.append(popped)
        if not passed:
            return out, skip, _FINISHED
        held = _least(passed, seg.asc)
        if budget.capped:
            # a shard stopped by the budget has not examined what lies past ``held``: the
            # merge took entries of the other shards from there out of order. They are given
            # back, to be walked again in order from ``held``
            while out and _beyond(out[-1], held, seg.asc):
                out.pop()
            while skipped and _beyond(skipped[-1], held, seg.asc):
                skipped.pop()
                skip += 1
        return out, skip, held


def _beyond(entry: tuple[str, bytes], mark: tuple[str, bytes] | None, asc: bool) -> bool:
    """Whether ``entry`` comes after ``mark`` (None: a segment's start) in walk order."""
    if mark is None:
        return True
    a, b = (float(entry[0]), entry[1]), (float(mark[0]), mark[1])
    return a > b if asc else a < b


def _least(marks: list[tuple[str, bytes] | None], asc: bool) -> tuple[str, bytes] | None:
    """The mark the walk has passed least far."""
    least = marks[0]
    for mark in marks[1:]:
        if least is not None and (mark is None or _beyond(least, mark, asc)):
            least = mark
    return least


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
        #: no more reads: the zset is walked to its end (``exhausted``) or the budget is spent
        self.done = False
        self.exhausted = False

    async def fill(self, want: int, expr: Expr, budget: _Budget) -> None:
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
            self.done = self.exhausted = bool(done)
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

    async def _verify(self, members: list[bytes], expr: Expr) -> list[bool]:
        """Flower's exact search semantics for the tasks Lua could not decide."""
        pipe = self.engine.client.pipeline(transaction=False)
        for m in members:
            pipe.hmget(self.shard.task(m.decode()), *_VERIFIED)
        out = []
        for m, values in zip(members, await pipe.execute(), strict=True):
            n, s, w, *texts = values
            doc = Document.of(
                m.decode(),
                n.decode() if n else None,
                s.decode() if s else None,
                w.decode() if w else None,
                *(_json(t) for t in texts),
            )
            out.append(matches(expr, doc))
        return out


#: The task hash fields a search is verified on: the indexed three, then ``Document``'s texts.
_VERIFIED = (HIDDEN.name, HIDDEN.state, HIDDEN.worker, *TEXT_FIELDS)


def _json(raw: bytes | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)
