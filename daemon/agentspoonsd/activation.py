"""Socket activation: adopt listening sockets passed by systemd (``LISTEN_FDS``).

With ``systemd/agentspoonsd.socket`` enabled, systemd binds the WebSocket port itself and passes
the listening socket to the daemon as file descriptor 3 (``LISTEN_FDS=1``,
``LISTEN_FDNAMES=websocket``, ``LISTEN_PID=<the process it started>``). systemd keeps its copy
open across restarts of the service, so connections made while the daemon restarts wait in the
accept queue instead of being refused, and a privileged port needs no capability in the daemon.

Guarantees:

* Only descriptors meant for this process are touched: ``LISTEN_PID`` must name it (or, frozen,
  its PyInstaller bootloader parent: see `agentspoonsd.sdnotify.own_pids`); otherwise nothing is
  adopted and the descriptors are left alone.
* ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from the environment (by
  default), so nothing the daemon might start inherits them.
* Adopted sockets are close-on-exec and non-blocking, like the daemon's own `bind_listener`.
* A passed descriptor that is not a listening stream socket is logged, closed and skipped;
  nothing here raises.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING

from .logs import get_logger
from .sdnotify import own_pids

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

SD_LISTEN_FDS_START = 3
ENV_PID, ENV_FDS, ENV_NAMES = "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"


def listen_fds(
    environ: Mapping[str, str], pids: Iterable[int] | None = None
) -> list[tuple[int, str]]:
    """The (descriptor, name) pairs that `environ` passes to this process; [] when none.

    Mirrors ``sd_listen_fds_with_names``: descriptors are 3, 4, … ``LISTEN_FDS`` of them; names
    come from the colon-separated ``LISTEN_FDNAMES`` ("unknown" where missing). Pure: no
    descriptor is inspected.
    """
    try:
        pid = int(environ.get(ENV_PID, ""))
        count = int(environ.get(ENV_FDS, ""))
    except ValueError:
        return []
    if count <= 0 or pid not in (own_pids() if pids is None else frozenset(pids)):
        return []
    names = environ.get(ENV_NAMES, "").split(":") if environ.get(ENV_NAMES) else []
    return [
        (SD_LISTEN_FDS_START + i, names[i] if i < len(names) and names[i] else "unknown")
        for i in range(count)
    ]


class InheritedSockets:
    """Listening sockets passed by systemd, by name. Take the ones you use, then `close_unused`."""

    def __init__(self, sockets: list[tuple[str, socket.socket]]) -> None:
        self._sockets = sockets

    def __len__(self) -> int:
        return len(self._sockets)

    @property
    def names(self) -> list[str]:
        """The names of the sockets not taken yet, in descriptor order."""
        return [name for name, _ in self._sockets]

    def take(self, name: str) -> socket.socket | None:
        """Remove and return the first socket named `name` (``FileDescriptorName=`` in the
        .socket unit), or None when systemd passed none by that name."""
        for i, (candidate, sock) in enumerate(self._sockets):
            if candidate == name:
                del self._sockets[i]
                return sock
        return None

    def close_unused(self) -> list[str]:
        """Close the sockets nobody took; return their names (worth a warning in the log)."""
        names = self.names
        for _, sock in self._sockets:
            sock.close()
        self._sockets = []
        return names


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None,
    *,
    unset: bool = True,
    pids: Iterable[int] | None = None,
    log: FilteringBoundLogger | None = None,
) -> InheritedSockets:
    """Adopt the listening sockets systemd passed to this process (none outside activation).

    `environ` defaults to ``os.environ``; with `unset` the ``LISTEN_*`` variables are removed
    from it whether or not they were for us. Call once, before binding any listener.
    """
    env = os.environ if environ is None else environ
    log = log if log is not None else get_logger("agentspoonsd.activation")
    passed = listen_fds(env, pids)
    if unset:
        for key in (ENV_PID, ENV_FDS, ENV_NAMES):
            env.pop(key, None)
    adopted: list[tuple[str, socket.socket]] = []
    for fd, name in passed:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # not a socket (or not open): ours by LISTEN_FDS all the same
            log.error("inherited_fd_unusable", fd=fd, fd_name=name, error=str(exc))
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        except OSError:
            listening = False
        if sock.type != socket.SOCK_STREAM or not listening:
            log.error("inherited_fd_not_listening", fd=fd, fd_name=name)
            sock.close()
            continue
        sock.set_inheritable(False)
        sock.setblocking(False)
        adopted.append((name, sock))
    return InheritedSockets(adopted)
