"""BENCHMARKS.md and the PNG charts, rendered from ``bench/out/results.json`` alone."""

from __future__ import annotations

import shutil
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.catalog import BEYOND_FLOWER_KEYS, MIXED, SCENARIOS
from bench.systems import ROOT

OUT = ROOT / "bench" / "out"
DOCS = ROOT / "docs" / "bench"
MD = ROOT / "BENCHMARKS.md"

Row = dict[str, Any]


def med(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """``median (min-max)``, or the value alone for one repeat."""
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(med(vals))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


def ms(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    value = seconds * 1000
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "-"
    return f"{a / b:.1f}x"


LABELS = {"flower": "Flower", "pollen-1": "Pollen, 1 collector", "pollen-2": "Pollen, 2 collectors"}


# --- charts --------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_ingest(rows: list[Row], path: Path) -> None:
    plt = _plt()
    groups = sorted({(r["broker"], r["mode"]) for r in rows})
    systems = [s for s in LABELS if any(r["system"] == s for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(systems), 1)
    for metric, ax, title in (
        ("loss", axes[0], "events lost (%)"),
        ("ingest_rate", axes[1], "ingest rate (task events/s)"),
    ):
        for i, system in enumerate(systems):
            mids, lo, hi = [], [], []
            for g in groups:
                vals = [
                    r[metric] * (100 if metric == "loss" else 1)
                    for r in rows
                    if (r["broker"], r["mode"]) == g and r["system"] == system
                ]
                m = med(vals) if vals else 0.0
                mids.append(m)
                lo.append(m - min(vals) if vals else 0)
                hi.append(max(vals) - m if vals else 0)
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, mids, width, yerr=[lo, hi], label=LABELS[system], capsize=3)
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{b}\n{m}" for b, m in groups])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Full-speed burst: same stream, one system at a time (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_sustained(rows: list[Row], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for system in LABELS:
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["offered_rate"])
        if not mine:
            continue
        xs = [r["offered_rate"] for r in mine]
        axes[0].plot(xs, [r["loss"] * 100 for r in mine], "o-", label=LABELS[system])
        axes[1].plot(xs, [r["drain_seconds"] for r in mine], "o-", label=LABELS[system])
    axes[0].set_title("events lost (%)")
    axes[0].set_ylim(bottom=0, top=max([1.0, *(r["loss"] * 110 for r in rows)]))
    axes[1].set_title("lag: seconds to drain after the last send")
    for ax in axes:
        ax.set_xlabel("offered task events/s")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Fixed send rates (RabbitMQ, unbatched)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def beyond_flower(scale: Row, meta: dict[str, Any]) -> list[str]:
    """Issue #17's features at the scale scenario's size: their keys' bytes and their reads."""
    reads = scale.get("beyond_flower")
    if not reads:
        return []
    breakdown = scale["fill"].get("memory_breakdown", {})
    L = [
        f"Beyond Flower at {scale['tasks']:,} tasks (failures by cause, windowed percentiles, "
        "queue health, export): Redis bytes per task of their keys (the task hash's `_x` and "
        "`queue` fields are in its figure above):",
        "",
        "| feature | keys | bytes per task |",
        "|---|---|---|",
    ]
    for feature, kinds in BEYOND_FLOWER_KEYS.items():
        total = sum(breakdown.get(k, 0.0) for k in kinds)
        L.append(f"| {feature} | {', '.join(f'`{k}`' for k in kinds)} | {total:,.2f} |")
    L += [
        "",
        f"Their reads at that size, {meta['sizes']['query_repeats']} sequential requests on one "
        "kept-alive connection (ms, p50 / p99):",
        "",
        "| read | p50 / p99 |",
        "|---|---|",
    ]
    for v in reads.values():
        status = "" if set(v["status"]) == {"200"} else f" {v['status']}"
        L.append(f"| `{v['example']}` | {ms(v['p50'])} / {ms(v['p99'])}{status} |")
    L.append("")
    return L


def listings(scale: Row) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The listings at the scale scenario's size, quiet and under full-speed ingest, with 1
    and 3 shards; and their target rows (issue #16: p99 <= 5 ms quiet, <= 10 ms under
    ingest)."""
    runs = scale.get("listings")
    if not runs:
        return [], []
    L = [
        f"`/api/tasks?limit=100` at {scale['tasks']:,} tasks: quiet, then while one writer "
        "applies the batched bench stream into the same Redis as fast as it can (new tasks, "
        "the oldest evicted; `python -m bench.micro --into`, its own process), "
        "with 1 shard and with 3 (ms, p50 / p99; ingest in events/s during the queries):",
        "",
        "| shards | query | quiet | under ingest | ingest |",
        "|---|---|---|---|---|",
    ]
    worst = {"quiet": 0.0, "under_ingest": 0.0}
    for shards, run in runs.items():
        ingest = run.get("ingest", {})
        note = "" if run.get("ingest_outlasted_queries") else " (ended before the queries)"
        for label, quiet in run["quiet"].items():
            loaded = run.get("under_ingest", {}).get(label)
            worst["quiet"] = max(worst["quiet"], quiet["p99"])
            if loaded:
                worst["under_ingest"] = max(worst["under_ingest"], loaded["p99"])
            loaded_text = f"{ms(loaded['p50'])} / {ms(loaded['p99'])}" if loaded else "-"
            rate = f"{ingest.get('events_per_s', 0):,.0f}{note}" if ingest else "-"
            L.append(
                f"| {shards} | `{quiet['example']}` | {ms(quiet['p50'])} / {ms(quiet['p99'])} "
                f"| {loaded_text} | {rate} |"
            )
    L.append("")
    sizes = " and ".join(runs)
    targets = [
        (
            f"/api/tasks?limit=100 p99 ≤ 5 ms at 1M tasks, quiet ({sizes} shards)",
            f"worst p99 {ms(worst['quiet'])} ms at {scale['tasks']:,} tasks",
            "met" if worst["quiet"] <= 0.005 else "missed",
        ),
        (
            f"/api/tasks?limit=100 p99 ≤ 10 ms under full-speed ingest ({sizes} shards)",
            f"worst p99 {ms(worst['under_ingest'])} ms",
            "met" if 0 < worst["under_ingest"] <= 0.010 else "missed",
        ),
    ]
    return L, targets


def chart_queries(memory: list[Row], scale: Row | None, path: Path) -> None:
    plt = _plt()
    series: list[tuple[str, dict[str, Any]]] = []
    for r in memory:
        series.append((f"{LABELS.get(r['system'], r['system'])} @ {r['tasks']:,}", r["queries"]))
    if scale:
        series.append((f"Pollen @ {scale['tasks']:,}", scale["queries"]))
    if not series:
        return
    labels = list(series[0][1])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(series)
    for i, (name, q) in enumerate(series):
        xs = [j + i * width for j in range(len(labels))]
        p50 = [q.get(lab, {}).get("p50", float("nan")) * 1000 for lab in labels]
        p99 = [q.get(lab, {}).get("p99", float("nan")) * 1000 for lab in labels]
        bars = ax.bar(xs, p99, width, alpha=0.35)
        ax.bar(xs, p50, width, label=f"{name} (p50 solid, p99 light)", color=bars[0].get_fc()[:3])
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=15, fontsize=8)
    ax.axhline(10, color="grey", ls="--", lw=0.8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Query latency, /api/tasks?limit=100 and /api/task/info (dashed: 10 ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_memory(memory: list[Row], scale: Row | None, path: Path) -> None:
    plt = _plt()
    names, values = [], []
    for r in memory:
        kind = "RSS" if r["system"] == "flower" else "Redis"
        names.append(f"{LABELS.get(r['system'], r['system'])}\n{kind} @ {r['tasks']:,}")
        values.append(r["bytes_per_task"])
    if scale:
        names.append(f"Pollen\nRedis @ {scale['tasks']:,}")
        values.append(scale["bytes_per_task"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, values, color=["#c44e52"] + ["#4c72b0"] * (len(values) - 1))
    ax.axhline(1024, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("bytes per task")
    ax.set_title("Memory per task (dashed: 1 KB target)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_write_path(micro: list[Row], lua: Row | None, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(micro):
        share = r["share"]
        parts = [(k, share[k]) for k in ("decode", "python_args", "redis_script", "other")]
        left = 0.0
        for j, (k, v) in enumerate(parts):
            if v is None:
                continue
            axes[0].barh(i, v * 100, left=left, color=f"C{j}", label=k if i == 0 else None)
            left += v * 100
    axes[0].set_yticks(range(len(micro)))
    axes[0].set_yticklabels(
        [
            f"{'batched' if r['batched'] else 'unbatched'}\n{r['events_per_s']:.0f} ev/s"
            for r in micro
        ]
    )
    axes[0].set_xlabel("% of write-path time")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Collector write path (decode + apply)")
    if lua:
        per = lua["per_command"]
        names = list(per)[:8]
        vals = [per[n]["usec_per_event"] for n in names]
        names.append("Lua logic")
        vals.append(lua["lua_logic_usec_per_event"])
        axes[1].barh(names[::-1], vals[::-1], color="#55a868")
        axes[1].set_xlabel("µs of Redis time per event")
        axes[1].set_title(f"apply_events.lua: {lua['script_usec_per_event']:.0f} µs/event")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- markdown ------------------------------------------------------------------------------


def _ingest_table(rows: list[Row]) -> list[str]:
    out = [
        "| broker | bodies | system | sent (task events) | counted | lost | offered ev/s "
        "| drain after last send (s) | ingest ev/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    grouped: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for r in rows:
        grouped[(r["broker"], r["mode"], r["system"])].append(r)
    for (b, m, s), rs in grouped.items():
        out.append(
            f"| {b} | {m} | {LABELS[s]} | {spread([r['sent'] for r in rs])} "
            f"| {spread([r['counted'] for r in rs])} "
            f"| {spread([r['loss'] * 100 for r in rs], '{:.1f}')} % "
            f"| {spread([r['offered_rate'] for r in rs])} "
            f"| {spread([r['drain_seconds'] for r in rs], '{:.1f}')} "
            f"| {spread([r['ingest_rate'] for r in rs])} |"
        )
    return out


def _ingest_ratios(rows: list[Row]) -> list[str]:
    out = ["| broker | bodies | Flower lost | Pollen (1) lost | Pollen (1) / Flower ingest ev/s |"]
    out.append("|---|---|---|---|---|")
    for b, m in sorted({(r["broker"], r["mode"]) for r in rows}):
        f = [r for r in rows if (r["broker"], r["mode"], r["system"]) == (b, m, "flower")]
        p = [r for r in rows if (r["broker"], r["mode"], r["system"]) == (b, m, "pollen-1")]
        if not f or not p:
            continue
        out.append(
            f"| {b} | {m} | {med(r['loss'] for r in f) * 100:.1f} % "
            f"| {med(r['loss'] for r in p) * 100:.1f} % "
            f"| {ratio(med(r['ingest_rate'] for r in p), med(r['ingest_rate'] for r in f))} |"
        )
    return out


def sustained_rate(rows: list[Row], system: str) -> float:
    ok = [
        r["offered_rate"]
        for r in rows
        if r["system"] == system and r["loss"] <= 0.001 and r["drain_seconds"] <= 5.0
    ]
    return max(ok) if ok else 0.0


def render(doc: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    meta = doc["meta"]
    charts: list[tuple[str, str]] = []

    def chart(name: str, title: str) -> Path:
        charts.append((name, title))
        return OUT / name

    L: list[str] = []
    L += [
        "# Benchmarks: Pollen vs Flower",
        "",
        "Generated by `bench/` — do not edit by hand; run `make bench` (about an hour) or "
        "`make bench BENCH_ARGS=--quick` (about 6 minutes) and commit the result.",
        "",
        f"- **Run**: {meta['date']}, mode **{meta['mode']}**, commit `{meta['commit']}`"
        + (
            f" (resumed {meta['date_resumed']} at `{meta.get('commit_resumed', '?')}`)"
            if "date_resumed" in meta
            else ""
        ),
        f"- **Command**: `{meta['command']}` → `{meta['argv']}`",
        f"- **Machine**: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gb']} GB, {meta['machine']['os']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in meta['machine']['load_at_start'])}"
        + (
            f", at end {', '.join(f'{x:.1f}' for x in meta['load_at_end'])}"
            if "load_at_end" in meta
            else ""
        ),
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- **Sizes**: `{meta['sizes']}`",
        "",
        "Everything runs on this one machine: the event generator, the broker, the system "
        "under test and its Redis share its cores (and, on a developer machine, other "
        "people's work). Absolute numbers are therefore modest and noisy; the point is the "
        "**ratio** between Flower and Pollen measured in the same run, on the same stream. "
        "Medians over repeats, with (min-max).",
        "",
        "The stream (`bench/generator.py`) is published through celery's own `EventDispatcher`:"
        " per task `task-sent` (client, unbatched), `task-received`, `task-started`, then "
        "`task-succeeded` (90 %), `task-failed` (5 %) or `task-retried` + a second attempt "
        "(5 %), 4 tasks in flight per worker, 4 workers each sending `worker-heartbeat` every "
        "2 s. *Batched* = workers buffer task events (`buffer_group=['task'], buffer_limit=24`)"
        " into `task.multi` list bodies, as celery workers do. Counting: Flower's "
        "`flower_events_total` (task events), Pollen's per-shard `counts` hashes (task events).",
        "",
    ]

    targets: list[tuple[str, str, str]] = []

    # ingest
    ingest = doc.get("ingest", [])
    if ingest:
        chart_ingest(ingest, chart("ingest.png", "Full-speed burst"))
        L += [
            "## Ingest: full-speed bursts",
            "",
            f"{ingest[0]['tasks']:,} tasks sent as fast as the generator can on a fresh broker,"
            " one system at a time. *Drain* is how long after the last send the count stopped "
            "moving; *ingest ev/s* = counted / (send time + drain).",
            "",
            *_ingest_table(ingest),
            "",
            *_ingest_ratios(ingest),
            "",
            "![ingest](docs/bench/ingest.png)",
            "",
        ]
    sustained = doc.get("sustained", [])
    if sustained:
        chart_sustained(sustained, chart("sustained.png", "Fixed rates"))
        f_rate = sustained_rate(sustained, "flower")
        p_rate = max(sustained_rate(sustained, "pollen-1"), sustained_rate(sustained, "pollen-2"))
        top = max(r["offered_rate"] for r in sustained)
        L += [
            "## Ingest: sustained rate",
            "",
            "Fixed send rates, rising, RabbitMQ, unbatched. *Sustained* = the highest offered "
            "rate with ≤ 0.1 % lost and drained within 5 s of the last send.",
            "",
            "| system | target ev/s | offered ev/s | lost | drain (s) |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(sustained, key=lambda r: (r["system"], r["rate_target"])):
            L.append(
                f"| {LABELS[r['system']]} | {r['rate_target']:.0f} | {r['offered_rate']:.0f} "
                f"| {r['loss'] * 100:.1f} % | {r['drain_seconds']:.1f} |"
            )
        L += [
            "",
            f"Sustained: Flower **{f_rate:.0f}** ev/s, Pollen **{p_rate:.0f}** ev/s "
            f"({ratio(p_rate, f_rate)}). The highest rate the generator reached here was "
            f"{top:.0f} ev/s: one Python publisher on a 2-core machine that also runs the "
            "broker and the system under test. Where a system's figure is at that ceiling it "
            "is a lower bound, not its limit; the backlog drain below measures Pollen's.",
            "",
            "![sustained](docs/bench/sustained.png)",
            "",
        ]
        targets.append(
            (
                "Zero-loss ingest ≥ 10x Flower's sustained rate",
                f"{ratio(p_rate, f_rate)} (Pollen {p_rate:.0f} vs Flower {f_rate:.0f} ev/s)",
                "met"
                if f_rate and p_rate >= 10 * f_rate
                else "not measurable here (the generator's ceiling; Pollen lost nothing)"
                if p_rate >= 0.9 * top
                else "missed",
            )
        )
    backlog = doc.get("backlog", [])
    if backlog:
        L += [
            "## Ingest capacity: draining a backlog (Pollen)",
            "",
            "The stream is published into the collectors' durable queue while they are "
            "stopped, then they start: the drain rate is the collectors' own capacity, without"
            " the generator competing for the cores. (Flower cannot do this: its queue is "
            "deleted when it stops and its messages expire after 5 s.)",
            "",
            "| bodies | collectors | task events | drain ev/s |",
            "|---|---|---|---|",
        ]
        grouped: dict[tuple[str, int], list[Row]] = defaultdict(list)
        for r in backlog:
            grouped[(r["mode"], r["collectors"])].append(r)
        for (m, c), rs in sorted(grouped.items()):
            L.append(
                f"| {m} | {c} | {spread([r['counted'] for r in rs])} "
                f"| {spread([r['rate'] for r in rs])} |"
            )
        best_batched = max(
            (med(r["rate"] for r in rs) for (m, _), rs in grouped.items() if m == "batched"),
            default=0.0,
        )
        one = grouped.get(("batched", 1), [])
        one_batched = med(r["rate"] for r in one) if one else 0.0
        L.append("")
        targets.append(
            (
                "≥ 100k events/s with batched bodies",
                f"{best_batched:,.0f} ev/s (backlog drain)",
                "met" if best_batched >= 100_000 else "missed",
            )
        )
        targets.append(
            (
                "One collector drains a batched backlog at ≥ 50k events/s",
                f"{one_batched:,.0f} ev/s",
                "met" if one_batched >= 50_000 else "missed",
            )
        )

    # write path
    micro = doc.get("micro", [])
    lua = doc.get("lua_profile")
    if micro:
        chart_write_path(micro, lua, chart("write_path.png", "Write path"))
        L += [
            "## The collector's write path, without a broker",
            "",
            "`bench/micro.py`: `Decoder` + `Writer` (one `apply_events.lua` call per batch of "
            "1000) against a private Redis, in one process. Time shares: decode alone, the "
            "Python side of the writer alone (Lua arguments + msgpack), the script's Redis time "
            "(`INFO commandstats`), the rest (round trips, batching). Profiles "
            "(pyinstrument): `bench/out/profile_writer_*.txt`.",
            "",
            "| bodies | events | write path ev/s | decode ev/s | args+msgpack ev/s "
            "| decode | args | Redis script | other |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in micro:
            s = r["share"]
            L.append(
                f"| {'batched' if r['batched'] else 'unbatched'} | {r['events']:,} "
                f"| {r['events_per_s']:,.0f} | {r['decode_events_per_s'] or 0:,.0f} "
                f"| {r['encode_events_per_s'] or 0:,.0f} | {s['decode'] * 100:.0f} % "
                f"| {s['python_args'] * 100:.0f} % | {s['redis_script'] * 100:.0f} % "
                f"| {s['other'] * 100:.0f} % |"
            )
        L.append("")
        fstate = doc.get("flower_state", [])
        if fstate:
            L += [
                "For scale, Flower's own handler (`EventsState.event`: celery's State merge, "
                "its search index and metrics) on the same events in one process, no broker: "
                + ", ".join(
                    f"{'batched' if r['batched'] else 'unbatched'} "
                    f"**{r['events_per_s']:,.0f} ev/s**"
                    for r in fstate
                )
                + " (Pollen / Flower: "
                + ", ".join(
                    ratio(m["events_per_s"], f["events_per_s"])
                    for m, f in zip(micro, fstate, strict=False)
                )
                + ").",
                "",
            ]
        if lua:
            L += [
                f"Inside Redis (`bench/lua_profile.py`, {lua['events']:,} events): the script "
                f"costs **{lua['script_usec_per_event']:.0f} µs per event** — "
                f"{lua['redis_calls_per_event']:.1f} `redis.call`s taking "
                f"{lua['commands_usec_per_event']:.0f} µs and "
                f"{lua['lua_logic_usec_per_event']:.0f} µs of Lua logic (TIME probes around "
                "each call)."
                + (
                    " Ablation (same batches): unpacking the arguments "
                    f"{lua['unpack_usec_per_event']:.1f} µs, reads + Lua logic "
                    f"{lua['reads_and_logic_usec_per_event']:.1f} µs (writes answered by a "
                    f"dummy), the writes {lua['writes_usec_per_event']:.1f} µs."
                    if "writes_usec_per_event" in lua
                    else ""
                )
                + " Redis runs scripts on "
                "one thread, so this caps one Redis (one shard) at about "
                f"{1e6 / lua['script_usec_per_event']:,.0f} events/s whatever the number of "
                "collectors.",
                "",
                "| command | calls per event | µs per event |",
                "|---|---|---|",
            ]
            for name, v in lua["per_command"].items():
                if v["calls_per_event"] >= 0.01:
                    L.append(f"| {name} | {v['calls_per_event']:.2f} | {v['usec_per_event']:.1f} |")
            L.append("")
        L += ["![write path](docs/bench/write_path.png)", ""]

    # memory and queries
    memory = doc.get("memory", [])
    scale = doc.get("scale")
    if memory or scale:
        chart_memory(memory, scale, chart("memory.png", "Memory per task"))
        chart_queries(memory, scale, chart("queries.png", "Query latency"))
        L += ["## Memory", ""]
        if memory:
            L += [
                f"The same {memory[0]['tasks']:,}-task stream, sent at "
                f"{meta['sizes']['fill_rate']:.0f} ev/s (a rate Flower keeps up with), into "
                "Flower, then into Pollen.",
                "",
                "| system | tasks | events counted | process RSS | Redis used_memory "
                "| bytes per task |",
                "|---|---|---|---|---|---|",
            ]
            for r in memory:
                a = r["memory_after"]
                L.append(
                    f"| {LABELS.get(r['system'], r['system'])} | {r['tasks']:,} "
                    f"| {r['counted']:,} of {r['sent']:,} | {mb(a['rss'])} "
                    f"| {mb(a['redis']) if a.get('redis') else '-'} "
                    f"| {r['bytes_per_task']:,.0f} "
                    f"({'RSS growth' if r['system'] == 'flower' else 'Redis growth'}) |"
                )
            L.append("")
        if scale:
            fill = scale["fill"]
            L += [
                f"Pollen alone at **{scale['tasks']:,} tasks** (Redis filled through the write "
                f"path: {fill['events']:,} events at {fill['events_per_s']:,.0f} ev/s): "
                f"**{scale['bytes_per_task']:,.0f} bytes of Redis per task**; API process RSS "
                f"{mb(scale['api_rss_start'])} at start, {mb(scale['api_rss_after_queries'])} "
                "after the queries.",
                "",
                "Where the bytes go (per task, `MEMORY USAGE`; the stream is capped at "
                f"{fill['stream_maxlen']:,} entries per shard):",
                "",
                "| key | bytes per task |",
                "|---|---|",
            ]
            for k, v in fill.get("memory_breakdown", {}).items():
                if v >= 1:
                    L.append(f"| `{k}` | {v:,.0f} |")
            L.append("")
            L += beyond_flower(scale, meta)
            script_us = fill["share"]["redis_script"] * fill["seconds"] / fill["events"] * 1e6
            targets.append(
                (
                    "Redis time ≤ 8 µs per event (`INFO commandstats`)",
                    f"{script_us:.1f} µs per event over the {fill['events']:,} events of the fill "
                    "(batched)",
                    "met" if script_us <= 8 else "missed",
                )
            )
            listed, listing_targets = listings(scale)
            L += listed
            targets += listing_targets
            targets.append(
                (
                    "≤ 1 KB of Redis per typical task",
                    f"{scale['bytes_per_task']:,.0f} B at {scale['tasks']:,} tasks",
                    "met" if scale["bytes_per_task"] <= 1024 else "missed",
                )
            )
        api_rss = [r.get("api_rss", 0) for r in memory if r["system"] != "flower"]
        if scale and api_rss:
            grow = scale["api_rss_after_queries"] - api_rss[0]
            targets.append(
                (
                    "API process memory flat as tasks grow",
                    f"{mb(api_rss[0])} at {memory[0]['tasks']:,} tasks, "
                    f"{mb(scale['api_rss_after_queries'])} at {scale['tasks']:,}",
                    "met" if grow < 30e6 else "missed",
                )
            )
        L += ["![memory](docs/bench/memory.png)", "", "## Queries", ""]
        qsets: list[tuple[str, dict[str, Any]]] = [
            (f"{LABELS.get(r['system'], r['system'])} @ {r['tasks']:,}", r["queries"])
            for r in memory
        ]
        if scale:
            qsets.append((f"Pollen @ {scale['tasks']:,}", scale["queries"]))
        if qsets:
            labels = list(qsets[0][1])
            L += [
                "Sequential requests on one kept-alive connection, "
                f"{meta['sizes']['query_repeats']} per query (ms, p50 / p99).",
                "",
                "| query | " + " | ".join(n for n, _ in qsets) + " | Flower / Pollen p50 |",
                "|---|" + "---|" * len(qsets) + "---|",
            ]
            for lab in labels:
                cells = []
                for _, q in qsets:
                    v = q.get(lab)
                    cells.append(
                        f"{ms(v['p50'])} / {ms(v['p99'])}"
                        + ("" if not v or set(v["status"]) == {"200"} else f" {v['status']}")
                        if v
                        else "-"
                    )
                f_q = qsets[0][1].get(lab) if memory and memory[0]["system"] == "flower" else None
                p_q = qsets[1][1].get(lab) if len(qsets) > 1 else None
                speedup = ratio(f_q["p50"], p_q["p50"]) if f_q and p_q else "-"
                L.append(f"| `{lab}` | " + " | ".join(cells) + f" | {speedup} |")
            L += [
                "",
                "Example paths: " + "; ".join(f"`{v['example']}`" for v in qsets[0][1].values()),
                "",
            ]
            if scale:
                listing = [
                    v["p99"]
                    for k, v in scale["queries"].items()
                    if k in ("tasks (default sort)", "tasks state=FAILURE", "tasks taskname=")
                ]
                worst = max(listing) if listing else float("nan")
                targets.append(
                    (
                        "/api/tasks?limit=100 p99 ≤ 10 ms at 1M tasks, indexed filters",
                        f"worst p99 {ms(worst)} ms at {scale['tasks']:,} tasks",
                        "met" if worst <= 0.010 else "missed",
                    )
                )
        L += ["![queries](docs/bench/queries.png)", ""]
        loads = [
            (LABELS.get(r["system"], r["system"]), r.get("load_1"), r.get("load_2")) for r in memory
        ]
        if any(x[1] for x in loads):
            L += [
                "## Scale-out: mixed read load",
                "",
                "16 concurrent clients for "
                f"{meta['sizes']['load_seconds']:.0f} s over: "
                + ", ".join(f"`{p}`" for p in MIXED)
                + ". Two Pollen API replicas share the same Redis (requests alternate).",
                "",
                "| system | replicas | requests/s | p50 ms | p99 ms | errors |",
                "|---|---|---|---|---|---|",
            ]
            for name, one, two in loads:
                for n, res in ((1, one), (2, two)):
                    if res:
                        lat = res["latency"]
                        L.append(
                            f"| {name} | {n} | {res['rps']:,.0f} | {ms(lat['p50'])} "
                            f"| {ms(lat['p99'])} | {res['errors']} |"
                        )
            L.append("")

    push = doc.get("push", [])
    if push:
        L += [
            "## Push: WebSocket fan-out (Pollen; Flower 2 has no event push)",
            "",
            "Bare WebSocket clients of `/api/events` (asyncio protocols in 2 client processes on "
            "the same machine; timed on the last event of each socket read) while the generator "
            "sends at a fixed rate on a Redis broker through one collector. *sender→client* "
            "includes the broker, the collector and the API; *collector→client* is the "
            "collector's commit, Redis pub/sub and the API's fan-out.",
            "",
            "| clients | events/s | messages delivered | closed early | sender→client p50 / p99 "
            "ms | collector→client p50 / p99 ms | API CPU (cores) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in push:
            s, c = r["sender_to_client"], r["collector_to_client"]
            cpu = f"{r['api_cpu_share']:.2f}" if "api_cpu_share" in r else "-"
            L.append(
                f"| {r['clients']} | {r['offered_rate']:.0f} | {r['messages']:,} of "
                f"{r['expected_messages']:,} | {r['closed_early']} | {ms(s['p50'])} / "
                f"{ms(s['p99'])} | {ms(c['p50'])} / {ms(c['p99'])} | {cpu} |"
            )
            if r["rate"] >= 1000:
                targets.append(
                    (
                        f"WebSocket p99 ≤ 50 ms at 1k events/s, {r['clients']} "
                        f"client{'s' if r['clients'] != 1 else ''}",
                        f"p99 {ms(s['p99'])} ms, "
                        f"{r['messages'] / max(1, r['expected_messages']) * 100:.0f} % delivered",
                        "met"
                        if s["p99"] <= 0.05 and r["messages"] >= r["expected_messages"]
                        else "missed",
                    )
                )
        L.append("")

    api_q = doc.get("api_queries")
    if api_q:
        L += [
            "## API query benchmark (`bench/api_queries.py`, the API team's)",
            "",
            f"`python -m bench.api_queries --tasks {api_q['tasks']}` (exit "
            f"{api_q['returncode']}); it seeds its own tasks through the writer and times "
            "Flower's handler work in-process (no HTTP) for comparison. Raw: "
            + ", ".join(f"`{f}`" for f in api_q.get("files", [])),
            "",
        ]
        L += _api_queries_tables(api_q)
        if api_q["returncode"] != 0:
            L += ["```", *api_q.get("stderr_tail", "").splitlines()[-15:], "```", ""]

    profiles = doc.get("profiles")
    if profiles and "skipped" not in profiles:
        L += [
            "## Profiles (py-spy on the real processes)",
            "",
            "Top frames by self time and by inclusive time; full text in "
            "`bench/out/profile_*.txt`.",
            "",
        ]
        for key, prof in profiles.items():
            L += [f"**{prof['title']}** ({prof['samples']} samples)", "", "```"]
            L += [f"self {share * 100:5.1f}%  {frame}" for frame, share in prof["self"][:10]]
            L += [
                f"incl {share * 100:5.1f}%  {frame}"
                for frame, share in prof["inclusive"][:14]
                if key
            ]
            L += ["```", ""]

    L += [
        "## Reproducing",
        "",
        "```sh",
        "make bench                                  # everything, writes this file",
        "make bench BENCH_ARGS=--quick               # small sizes, a smoke test",
        ".venv/bin/python -m bench --only ingest,backlog   # some scenarios: "
        + ",".join(SCENARIOS),
        ".venv/bin/python -m bench --resume [--redo micro] # finish an interrupted run",
        ".venv/bin/python -m bench --report-only     # re-render from bench/out/results.json",
        "# the parts on their own:",
        ".venv/bin/python -m bench.generator --broker amqp://guest:guest@127.0.0.1:5672/VHOST "
        "--tasks 10000 [--batched] [--rate 3000] [--procs 2]",
        ".venv/bin/python -m bench.micro --tasks 50000 [--batched] [--profile out.txt]",
        ".venv/bin/python -m bench.lua_profile --tasks 20000 --batched",
        ".venv/bin/python -m bench.lua_profile --tasks 20000 --batched --rounds 7 --against REV"
        "  # paired",
        ".venv/bin/python -m bench.api_queries --tasks 100000",
        "```",
        "",
        "Raw results: `bench/out/results.json` (not committed); profiles: "
        "`bench/out/profile_*.txt`.",
        "",
    ]

    if doc.get("errors"):
        L += ["## Scenario errors", ""]
        L += [f"- {e['scenario']}: `{e['error']}`" for e in doc["errors"]]
        L.append("")

    head = ["## Targets: where we stand", "", "| target | this run | status |", "|---|---|---|"]
    head += [f"| {t} | {v} | **{s}** |" for t, v, s in targets]
    head.append("")
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        head += [notes.read_text().strip(), ""]
    intro_end = L.index("") + 1
    body = L[:intro_end] + L[intro_end:]
    first_section = next(i for i, line in enumerate(body) if line.startswith("## "))
    text = "\n".join(body[:first_section] + head + body[first_section:]) + "\n"
    MD.write_text(text)
    for name, _ in charts:
        src = OUT / name
        if src.exists():
            shutil.copy(src, DOCS / name)


def _api_queries_tables(api_q: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for doc in api_q.get("results", []):
        for result in doc.get("results", []):
            systems = [
                k
                for k in ("pollen", "flower_in_process")
                if isinstance(result.get(k), dict) and result[k]
            ]
            if not systems:
                continue
            out += [
                f"At {result.get('tasks', 0):,} tasks (ms, p50 / p99):",
                "",
                "| query | " + " | ".join(systems) + " |",
                "|---|" + "---|" * len(systems),
            ]
            for label in result[systems[0]]:
                cells = []
                for s in systems:
                    v = result[s].get(label)
                    cells.append(
                        f"{v.get('p50_ms', '-')} / {v.get('p99_ms', '-')}"
                        if isinstance(v, dict)
                        else "-"
                    )
                out.append(f"| `{label}` | " + " | ".join(cells) + " |")
            ws = result.get("websocket")
            if isinstance(ws, dict) and ws:
                out += [
                    "",
                    f"WebSocket: {ws.get('clients')} clients at {ws.get('events_per_second')} "
                    f"events/s: p50 {ws.get('p50_ms', '-')} ms, p99 {ws.get('p99_ms', '-')} ms, "
                    f"{ws.get('deliveries', 0):,} of {ws.get('deliveries_expected', 0):,} "
                    f"deliveries, {ws.get('clients_cut', 0)} clients cut.",
                ]
            out.append("")
    return out
