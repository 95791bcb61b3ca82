"""``/api/events``: a WebSocket relay of the normalized events, with filters and resume.

One Redis pub/sub subscription per process (``EventHub``) is fanned out in-process to every
client. The hub takes the messages that arrived together (a collector batch) as one burst,
decodes each event once, encodes its WebSocket frame once, and for each distinct filter joins
the frames of the matching events once: a client costs one write of shared bytes per burst, not
one JSON encode or one write per event. aiohttp pings every ``POLLEN_WS_HEARTBEAT`` seconds and
drops a client that does not answer.

Bounded buffers: when a burst arrives, a client has at most ``POLLEN_WS_QUEUE`` events of
earlier bursts written but not yet taken by its socket (or buffered while it replays, or
waiting for its next batch), and is handed the burst; a client further behind is closed with
code 1013 and a reason, and never slows the others. A burst is what arrived together: one
collector call's events, or several calls'.

Messages are the normalized event JSON (the stream entry) plus ``stream_id``; with several
shards also ``cursor``: one stream id per shard, comma-joined in shard order, the position after
this event (every event of every shard up to it was relayed before it, or did not match the
client's filters). ``batch=<ms>`` (1..10000) sends, instead of one message per event, one JSON
array of the events of every ``ms`` milliseconds (a message only when there is one); replay and
the lost-events notice come as arrays too.

Resume: ``since=<cursor>`` replays the stream after that position (``XRANGE`` with an exclusive
start), then continues live with no gap and no duplicate: the client is registered with the hub
(live events are buffered) before the replay, and buffered events at or before the last
replayed id are dropped. A single id applies to every shard (stream ids are millisecond times,
so it reads as "since that time"). When events after the cursor were already trimmed from a
shard's stream, the client first receives
``{"type": "pollen-events-lost", "shard": i, "since": ..., "first_id": ...}``.

Filters (query parameters, each repeatable, all must match): ``type`` (``task-*`` style
wildcards), ``uuid``, ``taskname``, ``worker`` (the event's hostname), ``state`` (the task's
state after the event). Flower 1.0's ``/api/task/events/<type>/[<uuid>]`` paths are the same
relay with ``type`` (and ``uuid``) set.

Modules: ``ids`` (stream ids and cursors), ``filter`` (what a client asks for), ``frames``
(WebSocket frames written directly to the transport), ``client`` (one client's buffers),
``hub`` (the process's pub/sub subscription, app key ``HUB``), ``replay`` (``since=``),
``handler`` (the route, its OpenAPI paths).
"""

from services.api.events.handler import openapi_paths, routes
from services.api.events.hub import HUB, hub_ctx

__all__ = ["HUB", "hub_ctx", "openapi_paths", "routes"]
