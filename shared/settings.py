"""Every setting of every Pollen service, read from ``POLLEN_*`` environment variables.

One Struct is the schema, the defaults and the validator: field ``foo_bar`` is read from
``POLLEN_FOO_BAR``. A bad value stops the service with a message naming the variable.
The README's settings table is checked against this module by a test.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote, urlencode

import msgspec

from shared.alerts import ReceiverError, parse_receivers
from shared.redaction import RedactionError, parse_fields
from shared.retention import RetentionError
from shared.retention import parse as parse_retention

PREFIX = "POLLEN_"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
URL_PREFIX_RE = re.compile(r"^/?[A-Za-z0-9._~-]+(?:/[A-Za-z0-9._~-]+)*/?$")

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True)
class Sentinel:
    """A ``redis+sentinel://`` URL's parts: who to ask, for which master, and how to log in."""

    hosts: list[tuple[str, int]]
    service: str
    db: int
    ssl: bool
    username: str | None
    password: str | None
    sentinel_username: str | None
    sentinel_password: str | None
    #: the rest of the query (certificate and timeout options), for redis-py's URL parser
    query: str


def parse_sentinel(url: str) -> Sentinel | None:
    """``redis+sentinel://[user:password@]h1:26379[,h2:26379]/<service>[/<db>][?query]``;
    None for another scheme. Bad parts raise ``msgspec.ValidationError``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("redis+sentinel", "rediss+sentinel"):
        return None

    def bad(why: str) -> msgspec.ValidationError:
        return msgspec.ValidationError(
            f"{why}; expected {scheme}://[user:password@]host:port[,host:port]/<master name>"
            "[/<db>] - at `$.redis_url`"
        )

    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, _, secret = creds.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    hosts = []
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise bad(f"sentinel {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise bad("the path must be the master's name and optionally a db number")
    options = parse_qs(query)
    extra = {
        k: v[-1] for k, v in options.items() if k in ("sentinel_username", "sentinel_password")
    }
    rest_query = urlencode([(k, v) for k, vs in options.items() for v in vs if k not in extra])
    return Sentinel(
        hosts=hosts,
        service=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        ssl=scheme.lower().startswith("rediss"),
        username=username,
        password=password,
        sentinel_username=extra.get("sentinel_username"),
        sentinel_password=extra.get("sentinel_password"),
        query=rest_query,
    )


class SettingsError(ValueError):
    """A setting has a bad value; the message names the environment variable."""


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    # --- shared by every service -------------------------------------------------------------
    #: The user's Celery app, as ``celery -A`` takes it (``proj``, ``proj.celery:app``; also
    #: ``-A``/``--app`` of every console script): broker URL, SSL, transport options, login
    #: method, event and control exchanges and result backend are read from it.
    celery_app: str = ""
    #: Celery broker the events are read from and control commands are sent to (empty: the
    #: Celery app's, else ``redis://127.0.0.1:6379/0``); it wins over the app's.
    broker_url: str = ""
    #: JSON object laid over the app's ``broker_transport_options`` (e.g. Sentinel's
    #: ``{"master_name": "mymaster"}``, ``{"global_keyprefix": "prod:"}``).
    broker_transport_options: str = ""
    #: Redis holding Pollen's state: ``redis://``, ``rediss://`` (TLS, certificate options in
    #: the query: ``?ssl_ca_certs=/ca.pem``), ``unix://``, or Sentinel:
    #: ``redis+sentinel://host:26379,host2:26379/<master name>/<db>`` (``rediss+sentinel://``).
    redis_url: str = "redis://127.0.0.1:6379/1"
    #: Treat ``redis_url`` as one node of a Redis Cluster.
    redis_cluster: bool = False
    #: Replicas that must confirm each batch (Redis ``WAIT``) before the collector
    #: acknowledges it, so a failover to a replica loses nothing (1 with Sentinel; not with
    #: a cluster). A batch they do not confirm is applied again and waited for.
    redis_wait_replicas: NonNegativeInt = 0
    #: Prefix of every Redis key, so several Celery clusters can share one Redis.
    namespace: str = "pollen"
    #: Number of slot-local shards that tasks and their indexes are spread over.
    shards: PositiveInt = 1
    #: Log level of every service (DEBUG, INFO, WARNING, ERROR).
    log_level: str = "INFO"

    # --- collector -----------------------------------------------------------------------------
    #: RabbitMQ: name of a durable queue shared by collectors (empty: exclusive auto-delete queue).
    event_queue: str = ""
    #: RabbitMQ: a named event queue is deleted after this many seconds without consumers.
    event_queue_expires: Positive = 86400.0
    #: Most events applied to Redis in one batch.
    batch_size: PositiveInt = 1000
    #: Seconds the collector waits for events before doing its periodic work (health report,
    #: retention). A batch is whatever is waiting, applied at once: it grows with the load.
    batch_interval: Positive = 0.05
    #: Tasks kept (all shards together); beyond it the oldest (by last event) are evicted.
    max_tasks: PositiveInt = 1_000_000
    #: Seconds a task is kept after its last event (0: no age limit).
    task_ttl: NonNegativeInt = 7 * 86400
    #: Seconds a failed task is kept after its last event (0: no age limit).
    failed_task_ttl: NonNegativeInt = 30 * 86400
    #: Retention by task name: ``<task name pattern>=<success|failure|all|STATE>:<how long>,...``
    #: (how long: seconds, ``90d``, ``12h``, ``0`` = not kept, ``forever``); the first rule
    #: that matches a task's name and state wins over the two above (``shared/retention.py``).
    task_retention: str = ""
    #: Approximate length of the capped stream of normalized events (per shard).
    stream_maxlen: PositiveInt = 100_000
    #: Longer string fields (result, traceback, args...) are truncated to this many bytes.
    max_field_bytes: PositiveInt = 32768
    #: Days of per-minute counters kept for charts.
    chart_retention_days: PositiveInt = 2
    #: Key patterns (comma-separated, ``fnmatch``, case-insensitive) whose values are redacted
    #: in task args, kwargs and results before anything is stored (``shared/redaction.py``).
    redact_keys: str = ""
    #: ``<task name pattern>=<field>+<field>,...``: those fields (args, kwargs, result,
    #: exception, traceback) of those tasks are redacted whole before anything is stored.
    redact_fields: str = ""

    # --- api -----------------------------------------------------------------------------------
    #: Address the API binds; a non-loopback one needs credentials or ``unauthenticated_api``.
    api_host: str = "127.0.0.1"
    #: Port the API listens on.
    api_port: Port = 5555
    #: Path every route of the API lives under (``/flower``, as Flower's ``--url_prefix``):
    #: REST, WebSocket, metrics, health, the dashboard and its OpenAPI document.
    url_prefix: str = ""
    #: Largest page of ``/api/tasks``; a request without ``limit`` gets this many.
    max_page: PositiveInt = 1000
    #: Most tasks a free-text search examines per request.
    search_scan_limit: PositiveInt = 100_000
    #: Seconds of work one query (task listing, search) may take; a page cut short says so in
    #: ``X-Pollen-Scan-Capped``.
    query_time_limit: Positive = 5.0
    #: Most samples one ``/metrics`` answer holds; the rest are left out and counted in
    #: ``pollen_metrics_samples_dropped``.
    metrics_max_samples: PositiveInt = 100_000
    #: Exception classes that get their own ``exception`` label in
    #: ``pollen_task_failures_total``: the ones seen first; later ones count under ``other``.
    metrics_exception_labels: PositiveInt = 50
    #: Comma-separated bearer tokens, each ending in ``:ro`` (viewer), ``:op`` (operator) or
    #: ``:rw`` (admin, the default for a token without ``:``).
    api_tokens: str = ""
    #: Comma-separated ``user:password`` pairs for basic auth, each may end in ``:ro``, ``:op`` or
    #: ``:rw`` as tokens do.
    basic_auth: str = ""
    #: SSO through a trusted proxy (oauth2-proxy...): the request header naming the signed-in
    #: user (e.g. ``X-Forwarded-Email``); honoured only from ``auth_proxy_addresses``.
    auth_proxy_user_header: str = ""
    #: The header listing the user's groups, comma-separated (e.g. ``X-Forwarded-Groups``).
    auth_proxy_groups_header: str = ""
    #: Comma-separated addresses or networks (CIDR) of the proxies allowed to set those headers.
    auth_proxy_addresses: str = ""
    #: Roles of proxy users: ``admin=alice@corp,group:sre;operator=group:ops`` (viewer: read,
    #: operator: control tasks and workers, admin: also shut workers down).
    roles: str = ""
    #: Role of a proxy user no ``roles`` entry names (viewer, operator, admin, or none: 403).
    auth_proxy_default_role: str = "viewer"
    #: Allow binding a non-loopback address with no credentials configured.
    unauthenticated_api: bool = False
    #: Comma-separated host names an API without credentials answers besides loopback ones
    #: (DNS rebinding protection; ``*``: any).
    allowed_hosts: str = ""
    #: Comma-separated origins allowed by CORS; these pages may also control and open the
    #: WebSocket (``*`` allows reading only).
    cors_origins: str = ""
    #: Serve /healthz, /readyz and /metrics without credentials.
    open_health: bool = True
    #: Make every mutating endpoint answer 403.
    read_only: bool = False
    #: Seconds after which the collector's heartbeat is stale for /readyz.
    collector_stale_after: Positive = 15.0
    #: Seconds the API waits on Redis before answering 503 (socket and connect timeout).
    api_redis_timeout: Positive = 2.0
    #: Messages queued for one WebSocket client; a client that falls further behind is closed.
    ws_queue: PositiveInt = 1000
    #: Seconds between WebSocket pings; a client missing a pong is closed.
    ws_heartbeat: Positive = 20.0
    #: Most seconds the WebSocket relay holds live events to send them together. After each
    #: relay it rests twice as long as that relay took: many clients get fewer, larger
    #: writes (and make fewer reads), few clients get each event at once. 0: no rest.
    ws_max_delay: NonNegative = 0.05

    # --- enabler -------------------------------------------------------------------------------
    #: Seconds between enable_events broadcasts. The enablers' lease expires after 1.5 of these
    #: and is renewed every third of one, so a standby takes over within two intervals.
    enable_interval: Positive = 5.0
    #: Seconds between inspect rounds (stats, active_queues, registered, conf, task lists).
    inspect_interval: Positive = 30.0
    #: Seconds to wait for the workers' answers to an inspect or control command.
    inspect_timeout: Positive = 2.0
    #: Seconds a worker's stored inspect answers are kept after its last answer.
    inspect_ttl: Positive = 86400.0
    #: Seconds an offline worker is kept (Flower's ``--purge_offline_workers``); then its
    #: hash, inspect answers and every metric series labelled with it are removed (its tasks
    #: keep their ``worker``). 0: kept until ``max_workers`` makes room.
    offline_worker_ttl: NonNegativeInt = 7 * 86400
    #: Most workers kept: beyond it the longest-offline workers are removed first (a live
    #: worker never is).
    max_workers: PositiveInt = 10_000
    #: Seconds between queue length samples.
    queue_interval: Positive = 5.0
    #: Seconds between evaluations of the alert rules (``shared/alerts.py``).
    alert_interval: Positive = 15.0
    #: Where alerts go: ``<name>=<webhook|slack|alertmanager>:<url>,...``; rules name them.
    alert_receivers: str = ""
    #: Minutes of per-minute queue length history kept for charts.
    queue_history: PositiveInt = 1440
    #: RabbitMQ management API URL (``http://user:pass@host:15672/api/``) for queue lengths.
    broker_api: str = ""
    #: Extra queue names whose length is sampled, comma-separated.
    queues: str = ""

    # --- control (api) -------------------------------------------------------------------------
    #: Celery result backend for task apply/result/abort (empty: the Celery app's; with
    #: neither, those answer 503); it wins over the app's.
    result_backend: str = ""
    #: Most blocking Celery calls (control, publish, result) one API process runs at once.
    control_concurrency: PositiveInt = 8
    #: Longest wait (seconds) of /api/task/apply and /api/task/result for a task's result.
    result_timeout: Positive = 60.0
    #: Approximate number of control calls kept in the audit stream.
    audit_maxlen: PositiveInt = 10000
    #: Most tasks one bulk action (``/api/tasks/bulk/revoke``, ``.../resend``) touches.
    bulk_max: PositiveInt = 1000

    @property
    def redis_sentinel(self) -> Sentinel | None:
        """``redis_url`` as Sentinel parts, or None for a URL redis-py takes as it is."""
        return parse_sentinel(self.redis_url)

    def __post_init__(self) -> None:
        scheme = self.redis_url.partition("://")[0].lower()
        if scheme not in REDIS_SCHEMES:
            raise msgspec.ValidationError(
                f"the scheme must be one of {', '.join(REDIS_SCHEMES)} - at `$.redis_url`"
            )
        if self.redis_wait_replicas and self.redis_cluster:
            raise msgspec.ValidationError(
                "WAIT cannot confirm the writes of a whole cluster; leave it 0 with"
                " POLLEN_REDIS_CLUSTER - at `$.redis_wait_replicas`"
            )
        if self.redis_sentinel is not None and self.redis_cluster:
            raise msgspec.ValidationError(
                "a Sentinel URL cannot name a Redis Cluster - at `$.redis_cluster`"
            )
        # the credentials are parsed once here so a bad one stops every service at start
        parse_tokens(self.api_tokens)
        parse_basic_auth(self.basic_auth)
        parse_roles(self.roles)
        if self.auth_proxy_user_header and not parse_networks(self.auth_proxy_addresses):
            raise msgspec.ValidationError(
                "a user header needs POLLEN_AUTH_PROXY_ADDRESSES, the proxies allowed to set it"
                " - at `$.auth_proxy_addresses`"
            )
        if self.auth_proxy_default_role not in (*ROLES, "none"):
            raise msgspec.ValidationError(
                f"must be one of {', '.join(ROLES)} or none - at `$.auth_proxy_default_role`"
            )
        if self.broker_transport_options:
            try:
                options = msgspec.json.decode(self.broker_transport_options)
            except msgspec.DecodeError as exc:
                raise msgspec.ValidationError(
                    f"not JSON ({exc}) - at `$.broker_transport_options`"
                ) from None
            if not isinstance(options, dict):
                raise msgspec.ValidationError(
                    "must be a JSON object - at `$.broker_transport_options`"
                )
        if not NAMESPACE_RE.match(self.namespace):
            raise msgspec.ValidationError(
                "must be 1-64 characters of letters, digits, '_', '.' or '-' - at `$.namespace`"
            )
        if self.url_prefix and not URL_PREFIX_RE.match(self.url_prefix):
            raise msgspec.ValidationError(
                "must be a path like /flower (letters, digits, '-', '_', '.', '~' between"
                " slashes) - at `$.url_prefix`"
            )
        try:
            parse_receivers(self.alert_receivers)
        except ReceiverError as exc:
            raise msgspec.ValidationError(f"{exc} - at `$.alert_receivers`") from None
        try:
            parse_retention(self.task_retention)
        except RetentionError as exc:
            raise msgspec.ValidationError(f"{exc} - at `$.task_retention`") from None
        try:
            parse_fields(self.redact_fields)
        except RedactionError as exc:
            raise msgspec.ValidationError(f"{exc} - at `$.redact_fields`") from None
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise msgspec.ValidationError(
                "must be one of DEBUG, INFO, WARNING, ERROR - at `$.log_level`"
            )


#: Settings whose value is a secret: never shown in a message.
SECRET_FIELDS = frozenset(
    {"api_tokens", "basic_auth", "broker_transport_options", "alert_receivers"}
)
#: What a caller may do, least first: read; control tasks and workers; also shut workers down.
ROLES = ("viewer", "operator", "admin")
#: A credential's mode suffix and the role it gives (no suffix: admin, as before roles).
_MODES = {"ro": "viewer", "op": "operator", "rw": "admin"}


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _mode(item: str) -> tuple[str, str | None]:
    """``item`` without a trailing ``:ro``/``:op``/``:rw`` and its role (None: no suffix)."""
    head, sep, tail = item.rpartition(":")
    if sep and tail.lower() in _MODES:
        return head, _MODES[tail.lower()]
    return item, None


def parse_tokens(text: str) -> list[tuple[str, str]]:
    """``POLLEN_API_TOKENS`` as ``(token, role)``. Fails closed: a token with a ``:`` must end
    in a mode, so a mistyped one (``tok:RO!``) is an error, not an admin token. Messages name
    the item's position, never the secret."""
    out = []
    for i, item in enumerate(_items(text), 1):
        secret, role = _mode(item)
        if role is None and ":" in item:
            raise msgspec.ValidationError(
                f"token {i} has a ':' but does not end in ':ro', ':op' or ':rw' - at `$.api_tokens`"
            )
        if not secret:
            raise msgspec.ValidationError(f"token {i} is empty - at `$.api_tokens`")
        out.append((secret, role or "admin"))
    return out


def parse_basic_auth(text: str) -> list[tuple[str, str, str]]:
    """``POLLEN_BASIC_AUTH`` as ``(user, password, role)``: ``user:password[:ro|:op|:rw]``
    (a password that itself ends in ``:ro`` is written ``user:pass:ro:rw``)."""
    out = []
    for i, item in enumerate(_items(text), 1):
        user, sep, rest = item.partition(":")
        password, role = _mode(rest)
        if not sep or not user or not password:
            raise msgspec.ValidationError(
                f"pair {i}: expected user:password with a non-empty user and password"
                " - at `$.basic_auth`"
            )
        out.append((user, password, role or "admin"))
    return out


def parse_roles(text: str) -> dict[str, str]:
    """``POLLEN_ROLES`` (``admin=alice@corp,group:sre;operator=group:ops``) as
    ``{"alice@corp": "admin", "group:sre": "admin", ...}``: who gets which role when a trusted
    proxy names them. A user in several entries gets the highest role."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        role, sep, members = part.partition("=")
        role = role.strip().lower()
        if not sep or role not in ROLES or not _items(members):
            raise msgspec.ValidationError(
                f"expected role=member,...; roles are {', '.join(ROLES)}, members a user or"
                f" group:<name>, got {part!r} - at `$.roles`"
            )
        for member in _items(members):
            if ROLES.index(role) >= ROLES.index(out.get(member, "viewer")):
                out[member] = role
    return out


def parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``POLLEN_AUTH_PROXY_ADDRESSES``: addresses or networks (CIDR) of the trusted proxies."""
    try:
        return [ipaddress.ip_network(item, strict=False) for item in _items(text)]
    except ValueError as exc:
        raise msgspec.ValidationError(f"{exc} - at `$.auth_proxy_addresses`") from None


def _shown(field: str, value: Any) -> str:
    """A setting's value as a message may show it: secrets hidden, URL passwords masked."""
    if field in SECRET_FIELDS:
        return "<hidden>"
    return repr(mask_url(value) if isinstance(value, str) else value)


def mask_url(url: str) -> str:
    """``url`` for logs and messages: every password masked, in the user info of each URL of a
    ``;`` failover list and in the query (``sentinel_password=``). Never parses, so an URL no
    parser takes (several Sentinel hosts) is shown too."""
    url = re.sub(r"(://[^:/@;]*:)[^@/;]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&;]*", r"\1***", url)


def url_prefix(settings: Settings) -> str:
    """``POLLEN_URL_PREFIX`` as routes take it: ``""`` or ``/a/b`` (``flower/`` -> ``/flower``)."""
    path = settings.url_prefix.strip("/")
    return f"/{path}" if path else ""


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def setting_names() -> list[str]:
    """Every environment variable the settings read, in definition order."""
    return [env_name(f) for f in Settings.__struct_fields__]


_BOOLS = {
    f
    for f, t in zip(Settings.__struct_fields__, Settings.__annotations__.values(), strict=True)
    if t in ("bool", bool)
}
_BOOL_WORDS = {w: "true" for w in ("y", "yes", "t", "on")} | {
    w: "false" for w in ("n", "no", "f", "off")
}
_FIELD_RE = re.compile(r"at `\$\.(\w+)`")


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``environ`` (default ``os.environ``); raise ``SettingsError``."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in Settings.__struct_fields__:
        value = env.get(env_name(field))
        if value is not None and value != "":
            raw[field] = _BOOL_WORDS.get(value.strip().lower(), value) if field in _BOOLS else value
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _FIELD_RE.search(message)
        if match is None:
            raise SettingsError(f"invalid settings: {message}") from None
        name = env_name(match.group(1))
        detail = _FIELD_RE.sub("", message).rstrip(" -")
        shown = _shown(match.group(1), raw.get(match.group(1)))
        raise SettingsError(f"{name}={shown}: {detail}") from None


def describe() -> list[tuple[str, str, str]]:
    """``(variable, default, meaning)`` of every setting, from the ``#:`` comments above."""
    import inspect

    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(Settings).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif ":" in stripped and not stripped.startswith(("#", "def ", '"')):
            comments[stripped.split(":", 1)[0]] = " ".join(pending)
            pending = []
        else:
            pending = []
    defaults = Settings()
    rows = []
    for field in Settings.__struct_fields__:
        value = getattr(defaults, field)
        shown = ("1" if value else "0") if isinstance(value, bool) else str(value)
        rows.append((env_name(field), shown, comments.get(field, "")))
    return rows


def markdown_table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, meaning in describe():
        meaning = meaning.replace("``", "`").replace("|", "/")
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{name}` | {shown} | {meaning} |")
    return "\n".join(lines)


def load_or_exit(
    prog: str, argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """``load()`` for a service's entry point, with its command line (``-A/--app`` as
    ``celery -A`` takes it, which wins over ``POLLEN_CELERY_APP``): a bad value ends the
    process with status 2."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description="Settings are read from POLLEN_* environment variables."
    )
    parser.add_argument(
        "-A", "--app", help="the Celery app (proj, proj.celery:app); sets POLLEN_CELERY_APP"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if environ is None else environ)
    if args.app:
        env[env_name("celery_app")] = args.app
    try:
        return load(env)
    except SettingsError as exc:
        print(f"pollen: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    print(markdown_table())
