"""`dial`: one connect attempt (TCP, TLS, the WebSocket handshake) over anyio, and what it came
to: an open `Link`, the daemon's HTTP refusal, or why it failed. Reports nothing itself."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import anyio
import anyio.abc

from ..wscore import Accepted, ClientCore, Message, PongReceived, Refused
from ..wscore import Event as WsEvent
from .errors import ConnectFailed
from .link import MAX_MESSAGE, Link, describe_connect_error, ssl_reason


async def dial(
    url: str,
    *,
    headers: Sequence[tuple[bytes, bytes]],
    ssl_context: ssl.SSLContext | None,
    display_url: str,
    within: float,
) -> Link | Refused | ConnectFailed:
    """Connect to `url` (``ws://`` or ``wss://``) and complete the upgrade within `within`
    seconds. Returns the open link (the caller closes it), or a `Refused` (an HTTP answer to
    the upgrade; the socket is closed), or a `ConnectFailed` naming the cause with
    `display_url` (the socket is closed). Cancellation: at any await, closing what it opened.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    stream: anyio.abc.ByteStream | None = None
    link: Link | None = None
    event: WsEvent | None = None
    try:
        with anyio.fail_after(within):
            if secure:
                stream = await anyio.connect_tcp(
                    host,
                    port,
                    tls=True,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(host, port)
            core = ClientCore(host_header, resource, list(headers), max_message=MAX_MESSAGE)
            link = Link(stream, core)
            await link.flush()
            event = await link.next_event()
            while isinstance(event, PongReceived | Message):  # not before Accepted; safe
                event = await link.next_event()
    except TimeoutError:
        error = ConnectFailed(f"timed out connecting to {display_url}", timeout=True)
    except ssl.SSLError as exc:
        error = ConnectFailed(
            f"TLS handshake failed: {ssl_reason(exc)}: {display_url}", reason="tls"
        )
    except OSError as exc:
        error = describe_connect_error(exc, display_url)
    except BaseException:
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        raise
    else:
        assert link is not None
        if isinstance(event, Accepted):
            return link
        if isinstance(event, Refused):
            await anyio.aclose_forcefully(link.stream)
            return event
        if isinstance(link.error, ssl.SSLError):  # TLS can fail on the first read, too
            reason = ssl_reason(link.error)
            error = ConnectFailed(f"TLS handshake failed: {reason}: {display_url}", reason="tls")
        else:
            error = ConnectFailed(
                f"the connection closed during the handshake: {display_url}", reason="closed"
            )
    if stream is not None:
        await anyio.aclose_forcefully(stream)
    return error
