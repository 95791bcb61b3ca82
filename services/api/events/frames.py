"""What the relay writes to a socket, built once per event and shared by every client.

The relay bypasses aiohttp's ``WebSocketWriter`` on purpose: ``text_frame`` builds a frame's
bytes once, and each client gets them with one ``transport.write`` (``client.Client._write``);
aiohttp's writer would build the frame again for every client and await each write. This is
sound only because: the frames are final, unmasked text frames (a server never masks), no
compression is negotiated (``compress=False`` in the handler), and only the hub's loop writes
live frames while replayed messages and control frames go through aiohttp's writer before the
client is live or after it is cut (never interleaved within a frame). Anything else the
socket sends (pings, close) stays aiohttp's.
"""

from __future__ import annotations

import struct

from services.api.events.ids import Positions, format_id


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked WebSocket text frame (what a server sends) holding ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def with_cursor(message: bytes, positions: Positions) -> bytes:
    cursor = ",".join(format_id(s) if s else "0-0" for s in positions)
    return message[:-1] + b',"cursor":"' + cursor.encode() + b'"}'


def entry_message(sid: bytes, fields: dict[bytes, bytes]) -> bytes | None:
    body = fields.get(b"e")
    if not body or not body.endswith(b"}"):
        return None
    return body[:-1] + b',"stream_id":"' + sid + b'"}'
