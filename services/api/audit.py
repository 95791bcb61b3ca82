"""The control audit trail: ``<ns>:audit`` (stream), field ``e`` -> JSON ``{"time", "who",
"role", "action", "target", "params", "status", "sent", "reply"}`` per control call, written by
the API's control endpoints and read by ``/api/audit``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from shared.keys import Keys

_encode = msgspec.json.Encoder(enc_hook=repr).encode
_decode = msgspec.json.decode

Hash = Mapping[bytes, bytes]


async def record_audit(client: Any, keys: Keys, entry: Mapping[str, Any], maxlen: int) -> str:
    """Append one control call to ``<ns>:audit``; returns the entry id."""
    entry_id = await client.xadd(keys.audit, {"e": _encode(dict(entry))}, maxlen=maxlen)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def audit_entry(entry_id: bytes | str, fields: Hash) -> dict[str, Any]:
    """One ``<ns>:audit`` entry as the API returns it: its id plus the recorded fields."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    out: dict[str, Any] = {"id": text}
    out.update(_decode(fields[b"e"]))
    return out
