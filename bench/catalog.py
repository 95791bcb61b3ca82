"""What the benchmark runs, named once for the harness that runs it and the report that
describes it: the scenarios in their order, and the mixed query load of the scale scenario."""

from __future__ import annotations

SCENARIOS = ("micro", "memory", "scale", "ingest", "backlog", "sustained", "push", "profile")

#: The paths the scale scenario's clients request in turn.
MIXED = [
    "/api/tasks?limit=100",
    "/api/tasks?limit=100&state=FAILURE",
    "/api/tasks?limit=100&taskname=proj.sync.pull_orders",
    "/api/tasks?limit=20&offset=1000",
    "/api/workers?status=true",
    "/api/task/types",
]
