"""``python -m services.healthcheck api|collector|enabler``: a container healthcheck.

Exits 0 when the service is healthy, else 1 with the reason on stderr. Reads the same
``POLLEN_*`` settings as the service it checks:

- ``api``: ``/healthz`` of the API on this host's ``POLLEN_API_PORT`` (under
  ``POLLEN_URL_PREFIX``) answers 200.
- ``collector``: a collector on this host (its id is ``<hostname>-<pid>``) has a heartbeat in
  Redis younger than ``POLLEN_COLLECTOR_STALE_AFTER``.
- ``enabler``: Redis answers and an enabler holds the lease (standbys are healthy while one is
  active; with none active for 1.5 enable intervals, every enabler is unhealthy).
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.request

from shared.connections import REDIS_ERRORS, sync_client
from shared.keys import Keys
from shared.settings import Settings, load_or_exit, url_prefix

TIMEOUT = 3.0


def check_api(settings: Settings) -> str | None:
    host = settings.api_host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{settings.api_port}{url_prefix(settings)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            if response.status == 200:
                return None
            return f"{url} answered {response.status}"
    except OSError as exc:
        return f"{url}: {exc}"


def check_collector(settings: Settings) -> str | None:
    keys = Keys(settings.namespace, settings.shards)
    prefix = f"{socket.gethostname()}-"
    client = sync_client(settings, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        entries = client.zrange(keys.collectors, 0, -1, withscores=True)
    except REDIS_ERRORS as exc:
        return f"redis: {exc}"
    finally:
        client.close()
    beats = [score for member, score in entries if member.decode().startswith(prefix)]
    if not beats:
        return f"no collector of this host ({prefix}*) has reported to {keys.collectors}"
    age = time.time() - max(beats)
    if age > settings.collector_stale_after:
        return (
            f"this host's newest collector heartbeat is {age:.1f} s old "
            f"(POLLEN_COLLECTOR_STALE_AFTER={settings.collector_stale_after:g})"
        )
    return None


def check_enabler(settings: Settings) -> str | None:
    keys = Keys(settings.namespace, settings.shards)
    client = sync_client(settings, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        holder = client.get(keys.enabler_lease)
    except REDIS_ERRORS as exc:
        return f"redis: {exc}"
    finally:
        client.close()
    return None if holder else f"no enabler holds the lease ({keys.enabler_lease})"


CHECKS = {"api": check_api, "collector": check_collector, "enabler": check_enabler}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in CHECKS:
        print(f"usage: python -m services.healthcheck {'|'.join(CHECKS)}", file=sys.stderr)
        return 2
    problem = CHECKS[args[0]](load_or_exit("pollen-healthcheck", argv=[]))
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
