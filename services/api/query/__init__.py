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

Modules: ``plan`` (a query as segments: the index walked and the filters left), ``walk`` (the
engine: segments walked in Lua chunks within a budget, shards merged), ``cursor`` (the
``X-Pollen-Next-Cursor`` codec), ``search`` (Flower's search syntax, prefiltered for Lua).
"""

from services.api.query.cursor import CursorError
from services.api.query.plan import SORT_KEYS, TaskQuery
from services.api.query.walk import Page, Position, QueryEngine

__all__ = ["SORT_KEYS", "CursorError", "Page", "Position", "QueryEngine", "TaskQuery"]
