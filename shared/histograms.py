"""Percentiles of the collector's bucketed histograms (runtime, waits), as Prometheus'
``histogram_quantile`` estimates them: for the API's charts and the enabler's alert rules."""

from __future__ import annotations

from shared.keys import RUNTIME_BUCKETS


def quantile(
    q: float, counts: list[float], buckets: tuple[float, ...] = RUNTIME_BUCKETS
) -> float | None:
    """Prometheus' ``histogram_quantile`` over per-bucket (not cumulative) ``counts`` of
    ``buckets`` plus a last ``+Inf`` bucket: linear inside the bucket holding the rank, the
    first bucket starting at 0; a rank in ``+Inf`` gives the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if cumulative + count >= rank and count > 0:
            if i >= len(buckets):
                return buckets[-1]
            lower = buckets[i - 1] if i > 0 else 0.0
            upper = buckets[i]
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return buckets[-1]


def labels(buckets: tuple[float, ...]) -> dict[str, int]:
    """Bucket label (as the collector writes it: ``repr`` of the bound) -> position."""
    return {label: i for i, label in enumerate([*(repr(b) for b in buckets), "+Inf"])}
