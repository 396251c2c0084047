"""The descriptor budget: how many WebSocket clients the daemon's processes can hold.

Each client holds one descriptor for its life. Past the process's limit (RLIMIT_NOFILE) every
accept() fails with EMFILE, on the HTTP port as on the WebSocket port: the probes and /metrics
would go unanswered exactly when the daemon is full, and clients past the limit would wait in
the accept queue for nothing. So the daemon raises its soft limit to the hard one at start
(`raise_soft_limit`: the hard limit is what the operator, or systemd's ``LimitNOFILE=``,
granted), and caps ``[server] max_connections`` at what the limit leaves once `RESERVED`
descriptors and the HTTP port's own connections are set aside (`connection_capacity`): past
it new clients are answered 503 and closed at once, and the HTTP port keeps its descriptors.
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["RESERVED", "connection_capacity", "raise_soft_limit"]

RESERVED = 64
"""Descriptors kept for everything but clients: the listeners, the event loop's epoll and
wake-up pipe, the log and history files, a config or TLS file being re-read, the broker's Redis
connections, a worker's channel and handoff socket, and a connection being refused with 503."""

_NR_OPEN = Path("/proc/sys/fs/nr_open")  # the kernel's ceiling for a limit set as "unlimited"


def raise_soft_limit() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (processes it starts, such as
    fan-out workers, inherit it); returns the soft limit now in force, None when unlimited.

    A hard limit of "unlimited" becomes the kernel's ``fs.nr_open`` (the most a process may
    set). Where raising fails the soft limit stays as it was and is returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(_NR_OPEN.read_text())
        except (OSError, ValueError):
            return None if soft == resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def connection_capacity(limit: int | None, workers: int, http_connections: int) -> int | None:
    """The most WebSocket clients the daemon can hold with `limit` descriptors per process
    (None: unlimited, no cap).

    One process (``workers`` = 1) serves the clients and the HTTP port, whose
    ``[health] max_connections`` (`http_connections`) are set aside too. With workers, each
    worker process has the whole `limit` for its clients (the master, which keeps the HTTP
    port, holds an accepted connection only until it is handed over), and the workers together
    hold ``workers`` times what one holds. At least 1."""
    if limit is None:
        return None
    if workers > 1:
        return workers * max(1, limit - RESERVED)
    return max(1, limit - RESERVED - http_connections)
