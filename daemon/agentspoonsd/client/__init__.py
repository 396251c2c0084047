"""The agentspoonsd client: every update once, in order, under asyncio, Trio or no event loop.

The same code runs on asyncio and Trio (anyio underneath; the WebSocket protocol is the sans-IO
`agentspoonsd.wscore` over anyio's TCP/TLS streams). Four ways to use it:

**Iteration** (recommended), under ``asyncio.run`` or ``trio.run``::

    async with open_client("ws://127.0.0.1:8765/", token=TOKEN) as client:
        async for update in client:          # each `data` object of a volatility_update
            print(update["symbol"], update["seq"], update["volatility"])

**The original system's API** (`WebSocketDashboardClient`): ``await client.connect()`` (no
nursery), ``await client.listen(callback)`` with messages in the original shape, synchronous
``get_latest_data()`` / ``get_data_history(limit)`` reading the local buffer of received data.

**No event loop** (scripts, Jupyter cells): ``with connect_sync(url, token) as c: for update in
c: ...``; the client's loop runs in a background thread (anyio's blocking portal).

**A nursery or task group of yours**: ``await client.connect(nursery)`` starts the connection
task there; leaving the nursery, even cancelled, disconnects cleanly.

Guarantees (docs/PROTOCOL.md is the contract they rest on):

- **No gap, no duplicate, in order.** The client remembers the last seq it accepted per symbol.
  An update whose seq is not above it is dropped (a duplicate); one more than one above it means
  something was missed, so the client reconnects and resumes from the last seq it has rather than
  deliver it. A reconnect (after any loss of the connection, a daemon restart included) resumes
  every symbol it has seen with ``?symbols=...&resume=SYMBOL:SEQ,...``, so the daemon replays
  what was missed before anything live, atomically.
- **Unless the daemon cannot fill the gap.** It then sends ``reset`` (the missed updates are no
  longer retained, or belong to another history: a restart without ``[history] persist``). The
  client raises `StreamReset` from the iteration, *in stream order*: every update before it has
  been delivered, and the next one is the first of the new sequence (``oldest_seq``). Catch it
  and iterate again; the client stays connected.
- **Reconnection** uses exponential backoff with full jitter (`backoff_delay`): attempt n waits a
  uniformly random time in [0, min(backoff_max, backoff_initial × 2ⁿ)). The attempt counter
  starts over once a connection has delivered an update. HTTP 401/403 on the upgrade (and close
  code 4001) are not retried: `AuthenticationError`, with the daemon's reason.
- **Visible failures.** Each failed connect is reported with its cause (connection refused, DNS,
  TLS, an HTTP refusal with the daemon's reason) to ``on_status`` (kind ``connect_failed``) and
  to the `logging` logger ``agentspoonsd.client`` (the first of a series at WARNING, the rest at
  INFO). The *first* connection must succeed within ``connect_timeout`` seconds, or `connect`
  (and ``open_client``) raises `ConnectFailed` with the last cause; ``connect_timeout=None``
  keeps trying until connected. Once connected, losing the connection is always retried (with
  ``reconnect=True``).
- **Cancellation.** Cancelling an iteration (or a `receive`) loses nothing: an update is removed
  from the buffer only when it is returned. Leaving ``open_client`` (or `disconnect`), even
  because of a cancellation, sends a WebSocket close (1000) and waits up to ``close_timeout`` for
  the daemon's answer before the TCP connection is closed.
- **Backpressure.** Updates wait in a buffer of ``buffer_size``; when it is full the client stops
  reading the socket (unless a request is waiting for its reply), so a slow consumer slows the
  connection down instead of growing memory. The daemon may then close the connection (1013);
  the client reconnects and resumes, losing nothing.

`get_latest_data` and `recent` reflect the updates *received*, which can be ahead of what the
iteration has returned. A client nobody iterates or listens to stops reading once its buffer is
full.

Where the connection task lives: in the task group of ``open_client``; in the nursery passed to
`connect`; without one (``await client.connect()``), in a task of the running loop itself (an
asyncio task, or a Trio system task) that `disconnect` ends. Such a task is cancelled when the
loop ends (``asyncio.run``/``trio.run`` returning), closing the socket without a close frame:
call `disconnect` (or use ``async with``) to close cleanly.

Importing this module loads neither numpy, pydantic nor the daemon: only anyio, wsproto, orjson.

Inside, sans-IO parts that decide and anyio parts that carry it out (as h11/wsproto do):
`config` (the options, checked), `tracker` (reconnect delays; seqs and the resume URL),
`session` (what each message of a connection means: deliver, drop, resync, settle a reply),
`retry` (when to try again, when to give up), `buffer` (what the consumer gets), `paging`
(history pages); `link` (one WebSocket connection over anyio), `dial` (one connect attempt),
`connection_task` (the connection loop), `lifetime` (where that task runs and how it ends),
`stream` (`VolatilityClient`, the facade), `facades` (`WebSocketDashboardClient`,
`SyncClient`), `errors` (what it raises).
"""

from __future__ import annotations

from .config import DEFAULT_URL
from .errors import (
    AuthenticationError,
    ClientClosed,
    ClientError,
    ConnectFailed,
    ConnectionLost,
    ProtocolViolation,
    ServerError,
    StreamReset,
)
from .facades import SyncClient, WebSocketDashboardClient, connect_sync
from .link import Status
from .stream import VolatilityClient, open_client
from .tracker import StreamTracker, Update, Verdict, backoff_delay

__all__ = [
    "DEFAULT_URL",
    "AuthenticationError",
    "ClientClosed",
    "ClientError",
    "ConnectFailed",
    "ConnectionLost",
    "ProtocolViolation",
    "ServerError",
    "Status",
    "StreamReset",
    "StreamTracker",
    "SyncClient",
    "Update",
    "Verdict",
    "VolatilityClient",
    "WebSocketDashboardClient",
    "backoff_delay",
    "connect_sync",
    "open_client",
]

# The public names keep the module they are imported from in reprs, tracebacks and pickles
# (`agentspoonsd.client.ConnectFailed`), whichever file of the package defines them.
for _name in __all__:
    _value = globals()[_name]
    if callable(_value):  # the classes and functions; DEFAULT_URL is a str
        _value.__module__ = __name__
del _name, _value
