"""The control audit trail: ``<ns>:audit`` (stream), field ``e`` -> JSON ``{"time", "who",
"role", "remote", "action", "target", "params", "status", "sent", "reply"}`` per control call
(a bulk action's also ``task_ids`` and, for a re-send, ``new_task_ids``: every id, unclipped),
written by ``audited`` endpoints whatever their outcome and read by ``/api/audit``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web
from multidict import MultiDict

from services.api import params
from services.api.auth import principal, require_role
from services.api.control.resource import CONTROL, Control
from services.api.errors import ApiError, bad_param
from services.api.openapi import CONTROL_ERRORS, Spec, json_body, operation, param
from shared.connections import REDIS_ERRORS
from shared.keys import Keys

log = logging.getLogger("pollen.api.control")

_encode = msgspec.json.Encoder(enc_hook=repr).encode
_decode = msgspec.json.decode

#: Parameters never recorded in the audit: credentials.
SECRET_PARAMS = frozenset({"token"})
#: Longest text of parameters or reply kept in one audit entry.
AUDIT_TEXT_LIMIT = 2048


def _clip(value: Any) -> Any:
    text = msgspec.json.encode(value, enc_hook=repr)
    if len(text) <= AUDIT_TEXT_LIMIT:
        return value
    return text[:AUDIT_TEXT_LIMIT].decode(errors="replace") + "..."


#: The JSON body of a publishing call, as sent.
BODY_KEY = web.RequestKey("pollen.control.body", object)
#: The message a publishing call really sent: task name, id, args, kwargs and options.
SENT_KEY = web.RequestKey("pollen.control.sent", object)
#: The ids a bulk action touched (``{"task_ids": [...], "new_task_ids": [...]}``): recorded
#: whole, as they are bounded by ``POLLEN_BULK_MAX``.
IDS_KEY = web.RequestKey("pollen.control.ids", dict)

Body = dict[str, Any]
Action = Callable[[web.Request, Control, MultiDict[str]], Awaitable[Body]]


def audited(
    action: str, target: str, role: str = "operator"
) -> Callable[[Action], Callable[[web.Request], Any]]:
    """A mutating endpoint: the caller's role checked (``role`` at least), the call recorded
    whatever its outcome."""

    def wrap(fn: Action) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            ctl = request.app[CONTROL]
            started = time.time()
            status: int = 500
            reply: Any = None
            args: MultiDict[str] = MultiDict()
            try:
                args = await params.arguments(request)
                require_role(request, ctl.settings, role)
                body = await fn(request, ctl, args)
                status, reply = 200, body
                return web.json_response(body)
            except ApiError as exc:
                status, reply = exc.status, {"error": exc.message}
                raise
            except web.HTTPException as exc:
                status, reply = exc.status, {"error": exc.reason}
                raise
            except BaseException as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
                raise
            finally:
                given: dict[str, Any] = {k: v for k, v in args.items() if k not in SECRET_PARAMS}
                extra = request.get(BODY_KEY)
                if extra is not None:
                    given["body"] = extra
                sent = request.get(SENT_KEY)
                entry = {
                    "time": started,
                    "who": principal(request).name,
                    "role": principal(request).role,
                    "remote": request.remote,
                    "action": action,
                    "target": request.match_info.get(target, ""),
                    "params": _clip(given),
                    "status": status,
                    "reply": _clip(reply),
                }
                if sent is not None:
                    entry["sent"] = _clip(sent)
                entry.update(request.get(IDS_KEY) or {})
                await _record(ctl, entry)

        handler.__name__ = fn.__name__
        return handler

    return wrap


async def _record(ctl: Control, entry: dict[str, Any]) -> None:
    try:
        await record_audit(ctl.redis, ctl.keys, entry, ctl.settings.audit_maxlen)
    except REDIS_ERRORS as exc:
        # the call happened: keep the record in the log at least
        log.warning("audit entry not stored (%r): %s", exc, msgspec.json.encode(entry).decode())


async def record_audit(client: Any, keys: Keys, entry: Mapping[str, Any], maxlen: int) -> str:
    """Append one control call to ``<ns>:audit``; returns the entry id."""
    entry_id = await client.xadd(keys.audit, {"e": _encode(dict(entry))}, maxlen=maxlen)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def audit_entry(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """One ``<ns>:audit`` entry as the API returns it: its id plus the recorded fields."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    out: dict[str, Any] = {"id": text}
    out.update(_decode(fields[b"e"]))
    return out


async def audit(request: web.Request) -> web.StreamResponse:
    """Control calls, newest first: ``limit`` (1-1000, default 100), ``before`` (an entry id:
    older entries only). Answers ``{"entries": [...], "next": id or null}``."""
    ctl = request.app[CONTROL]
    limit = params.integer(request.query, "limit", 100, minimum=1, maximum=1000)
    assert limit is not None
    before = request.query.get("before")
    high = "+"
    if before:
        if not _is_stream_id(before):
            raise bad_param("before", f"not an audit entry id: {before!r}")
        high = f"({before}"
    rows = await ctl.redis.xrevrange(ctl.keys.audit, max=high, min="-", count=limit)
    entries = [audit_entry(entry_id, fields) for entry_id, fields in rows]
    return web.json_response(
        {"entries": entries, "next": entries[-1]["id"] if len(entries) == limit else None}
    )


def _is_stream_id(text: str) -> bool:
    ms, _, seq = text.partition("-")
    # ASCII digits only, each part within 64 bits: Redis refuses anything else (a 500)
    return all(p.isascii() and p.isdigit() and int(p) < 2**64 for p in (ms, seq or "0"))


routes = [web.get("/api/audit", audit)]
openapi_paths: Spec = {
    "/api/audit": operation(
        "get",
        "Control calls, newest first: who, what, when, reply",
        [
            param("limit", "entries (1-1000, default 100)", {"type": "integer"}),
            param("before", "an entry id: only older entries"),
        ],
        json_body(
            "entries and the id to pass as before= for the next page",
            {
                "type": "object",
                "properties": {
                    "entries": {"type": "array", "items": {"type": "object"}},
                    "next": {"type": ["string", "null"]},
                },
            },
        ),
        CONTROL_ERRORS,
    )
}
