"""Deaths: find the workers that died, so that their unfinished tasks are marked lost.

A death is a worker's last word when it is dead by celery's rule and no inspect answer says
otherwise, or the time of a worker-online, which ends the incarnation before it
(``shared.workers.deaths``). Each new one goes to every shard as a ``death`` event of
``apply_events.lua``, which keeps the shard's ``deaths`` and marks the worker's RECEIVED and
STARTED tasks whose newest event is not later (the lost rule is in that script's header).
A shard that has a death recorded needs it no more; one that missed it (the enabler died
half way) gets it in the next round.

Rounds follow the heartbeats: the next one is due when the next live worker goes offline
(``offline_since``), and at least every second, so a dead worker's tasks are marked at most
a round after celery's rule declares it dead.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from shared import apply_events
from shared.keys import MAX_DEATHS, Keys
from shared.settings import Settings
from shared.workers import deaths, event_state, known_workers, offline_since

log = logging.getLogger("pollen.enabler.deaths")

#: Longest and shortest wait between rounds, in seconds.
MOST_WAIT = 1.0
LEAST_WAIT = 0.05


def _recorded(raw: bytes | None) -> set[float]:
    return {float(v) for v in raw.split(b",")} if raw else set()


async def record_deaths(
    client: Any, keys: Keys, settings: Settings, script: Any, now: float
) -> tuple[dict[str, list[float]], float]:
    """One round: the deaths sent (host -> sender times), and when the next round is due."""
    hosts = await known_workers(client, keys)
    if not hosts:
        return {}, now + MOST_WAIT
    states = await event_state(client, keys, hosts)
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.inspected, 0, -1, withscores=True)
    for shard in keys.all_shards:
        pipe.hmget(shard.deaths, hosts)
    inspected_raw, *per_shard = await pipe.execute()
    # stored when the enabler's wait ended: the answer came up to a timeout before
    answered = {m.decode(): float(score) - settings.inspect_timeout for m, score in inspected_raw}
    due = now + MOST_WAIT
    missing: dict[int, list[dict[str, Any]]] = {}
    sent: dict[str, list[float]] = {}
    for i, (host, (h, seen)) in enumerate(zip(hosts, states, strict=True)):
        since = offline_since(h, seen, answered.get(host))
        if since > now:
            due = min(due, since)
        found = deaths(h, seen, answered.get(host), now)
        for shard, recorded in zip(keys.all_shards, per_shard, strict=True):
            have = _recorded(recorded[i])
            # the shard keeps the newest few: an older one missing there was dropped, not lost
            oldest = min(have, default=-math.inf)
            for when in found:
                if when not in have and (len(have) < MAX_DEATHS or when > oldest):
                    missing.setdefault(shard.index, []).append(apply_events.death(host, when))
                    if when not in sent.get(host, []):
                        sent.setdefault(host, []).append(when)
    if missing:
        config = apply_events.config(settings, keys, now, False)
        for index, events in missing.items():
            shard = keys.all_shards[index]
            await script(keys=[shard.stream], args=apply_events.args(shard, config, events))
        log.debug(
            "recorded deaths: %s",
            ", ".join(f"{host} at {max(times):.3f}" for host, times in sorted(sent.items())[:20]),
        )
    return sent, max(due, now + LEAST_WAIT)
