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

#: Pollen's own reads (issue #17: failures by cause, windowed percentiles, queue health,
#: export), timed by the scale scenario at its size; ``{exc}``: the bench stream's exception
#: class.
BEYOND_FLOWER = {
    "failures": "/api/failures",
    "tasks exception=": "/api/tasks?limit=100&exception={exc}",
    "stats/runtime minutes=120&compare=1": "/api/stats/runtime?minutes=120&compare=1",
    "stats/wait": "/api/stats/wait",
    "stats/wait minutes=120&compare=1": "/api/stats/wait?minutes=120&compare=1",
    "tasks/export limit=1000": "/api/tasks/export?limit=1000",
    "metrics": "/metrics",
}

#: The keys of those features, by ``bench.micro.memory_breakdown`` kind.
BEYOND_FLOWER_KEYS = {
    "failures by cause": ("idx:exc:*", "failures", "failminute:*", "failfirst", "faillast"),
    "windowed runtime": ("rtminute:*",),
    "wait histograms": ("wait", "wtminute:*"),
}
