"""The systemd notification protocol (sd_notify), without libsystemd.

A service started with ``Type=notify`` finds a datagram socket in ``$NOTIFY_SOCKET`` (a path, or
``@name`` in the abstract namespace) and reports its state there, one datagram of
newline-separated ``KEY=VALUE`` assignments per call: ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``,
``RELOADING=1`` (with ``MONOTONIC_USEC``), ``STOPPING=1``.

Guarantees:

* Nothing here raises into the daemon. A send that fails (no socket, systemd gone, queue full) is
  logged (once per kind of failure until a send succeeds again) and reported as ``False``.
* Nothing here blocks the event loop: datagrams are sent with ``MSG_DONTWAIT``.
* Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a cheap no-op returning ``False``.

One-file executables: PyInstaller's bootloader is the process systemd started (the unit's main
PID) and the daemon runs in its child. systemd names the main PID in ``WATCHDOG_PID``, so the
child also accepts its parent's PID there when it is frozen, and the unit needs
``NotifyAccess=all`` for the child's datagrams to be accepted.

Usage from the daemon (the unit's side is in ``systemd/README.md``)::

    notifier = Notifier.from_environ()
    nursery.start_soon(watchdog_loop, notifier)       # WATCHDOG=1 every WATCHDOG_USEC / 2
    nursery.start_soon(status_loop, notifier, stats)  # STATUS=<clients>, <updates/s>
    nursery.start_soon(ready_when, notifier, lambda: hub.last_publish is not None)  # READY=1
    notifier.reloading(); ...; notifier.ready()       # around a SIGHUP reload
    notifier.stopping()                               # on SIGTERM/SIGINT
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn, Protocol

import trio

from .logs import get_logger

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"

STATUS_EVERY = 5.0  # seconds between STATUS= updates from `status_loop`
# A gap between two pets longer than this fraction of the timeout is a near miss: petting is
# due every half timeout, so past 3/4 the event loop was stuck for a quarter of the timeout or
# more, and one more such stall gets the service killed.
NEAR_MISS_FRACTION = 0.75


def own_pids() -> frozenset[int]:
    """The PIDs systemd may name as "this service's process" for the running code.

    Always our own PID; when frozen (PyInstaller), also our parent's: in a one-file build the
    bootloader parent is the process systemd started, and it names that one in ``WATCHDOG_PID``
    and ``LISTEN_PID``.
    """
    pids = {os.getpid()}
    if getattr(sys, "frozen", False):
        pids.add(os.getppid())
    return frozenset(pids)


def socket_address(value: str | None) -> bytes | None:
    """The AF_UNIX address a ``$NOTIFY_SOCKET`` value names, or None when it names none we can use.

    ``/path`` is a filesystem socket; ``@name`` an abstract one (a leading NUL byte). Other forms
    (``vsock:…``, relative paths) are unsupported and give None.
    """
    if not value:
        return None
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def watchdog_timeout(
    environ: Mapping[str, str] | None = None, pids: Iterable[int] | None = None
) -> float | None:
    """The watchdog timeout in seconds that systemd asks of this process, or None.

    Mirrors ``sd_watchdog_enabled``: None when ``WATCHDOG_USEC`` is unset, not a positive integer,
    or when ``WATCHDOG_PID`` is set and names a process other than ours (`own_pids`). The caller
    must pet at least every timeout / 2 (what `watchdog_loop` does).
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_WATCHDOG_USEC)
    if raw is None:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get(ENV_WATCHDOG_PID)
    if raw_pid is not None:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        if pid not in (own_pids() if pids is None else frozenset(pids)):
            return None
    return usec / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass
class PetLog:
    """The gaps between WATCHDOG=1 pets, against the watchdog timeout. Pure: times are passed in.

    Exposed on /metrics (``agentspoonsd_watchdog_*``), so a monitoring system sees a stall that
    nearly got the daemon killed before systemd's watchdog fires for real.
    """

    timeout: float | None = None  # seconds; None: no watchdog (near misses are never counted)
    pets: int = 0
    near_misses: int = 0
    longest_gap: float = 0.0
    _last: float | None = field(default=None, repr=False)

    def record(self, now: float) -> float | None:
        """Record a pet at `now` (monotonic seconds); the gap since the previous pet, or None for
        the first. A gap past `NEAR_MISS_FRACTION` of the timeout counts as a near miss."""
        gap = None if self._last is None else now - self._last
        self._last = now
        self.pets += 1
        if gap is not None:
            self.longest_gap = max(self.longest_gap, gap)
            if self.is_near_miss(gap):
                self.near_misses += 1
        return gap

    def is_near_miss(self, gap: float) -> bool:
        """True when a gap of `gap` seconds between two pets came close to the timeout."""
        return self.timeout is not None and gap > NEAR_MISS_FRACTION * self.timeout


class Notifier:
    """Sends notifications to one ``$NOTIFY_SOCKET``, read once when the notifier is made.

    Every method returns True when the datagram was handed to the kernel, False otherwise, and
    never raises. Safe to call from Trio tasks and from threads.
    """

    def __init__(
        self,
        address: bytes | None,
        watchdog_timeout: float | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.address = address
        #: Seconds systemd waits for a WATCHDOG=1 before it kills the service; None: no watchdog.
        self.watchdog_timeout = watchdog_timeout
        self._log = log if log is not None else get_logger("agentspoonsd.sdnotify")
        self._failing: str | None = None  # the failure last logged; cleared by a success
        #: The pets `watchdog_loop` sent, and how late they came.
        self.pets = PetLog(watchdog_timeout)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, log: FilteringBoundLogger | None = None
    ) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` of `environ` (os.environ)."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_SOCKET)
        notifier = cls(socket_address(raw), watchdog_timeout(env), log)
        if raw and notifier.address is None:
            notifier._log.warning("sd_notify_unsupported_socket", notify_socket=raw)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (the daemon runs under systemd Type=notify)."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1: half the timeout, as systemd recommends."""
        return None if self.watchdog_timeout is None else self.watchdog_timeout / 2

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram. A newline inside one is replaced by a
        space (it would start a new assignment)."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except Exception as exc:  # OSError above all; nothing may escape into the daemon
            failure = (
                errno.errorcode.get(exc.errno, str(exc.errno))
                if isinstance(exc, OSError) and exc.errno is not None
                else type(exc).__name__
            )
            if failure != self._failing:
                self._failing = failure
                self._log.warning(
                    "sd_notify_failed",
                    error=str(exc),
                    failure=failure,
                    notify_socket=os.fsdecode(self.address).replace("\0", "@", 1),
                    message=assignments[0],
                )
            return False
        if self._failing is not None:
            self._failing = None
            self._log.info("sd_notify_recovered")
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete. Optionally with a STATUS= line."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str | None = "reloading configuration") -> bool:
        """RELOADING=1 with MONOTONIC_USEC; follow with `ready` once the reload is done."""
        lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        return self.send(*lines, *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = "shutting down") -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive."""
        return self.send("WATCHDOG=1")


async def watchdog_loop(
    notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Send WATCHDOG=1 every ``notifier.watchdog_interval`` seconds, forever; cancel to stop.

    The first one goes out at once. Runs as a plain Trio task, so a blocked event loop stops the
    petting and systemd's watchdog fires. Each pet is recorded in ``notifier.pets``; one that
    comes close to the timeout is logged as ``watchdog_near_miss``. Without a watchdog it just
    sleeps, so it may be started unconditionally (also under `supervise`: it never returns and
    never raises).
    """
    task_status.started()
    interval = notifier.watchdog_interval
    if interval is None or not notifier.enabled:
        await trio.sleep_forever()
    deadline = trio.current_time()
    while True:
        gap = notifier.pets.record(trio.current_time())
        if gap is not None and notifier.pets.is_near_miss(gap):
            notifier._log.warning(
                "watchdog_near_miss", gap_s=round(gap, 3), timeout_s=notifier.watchdog_timeout
            )
        notifier.watchdog()
        deadline += interval
        now = trio.current_time()
        if deadline < now:  # we were late (a slow loop): keep the cadence, don't burst
            deadline = now + interval
        await trio.sleep_until(deadline)


async def ready_when(
    notifier: Notifier,
    is_ready: Callable[[], bool],
    *,
    poll: float = 0.05,
    status: str | None = "serving",
) -> None:
    """Send READY=1 (with `status`) as soon as `is_ready()` is true, checked every `poll` s,
    then return. For "the first update exists": ``lambda: hub.last_publish is not None``."""
    # Polling, not an Event: the condition belongs to another service (the hub), which needs no
    # hook for it; 20 checks a second until start-up completes cost nothing.
    while not is_ready():  # noqa: ASYNC110
        await trio.sleep(poll)
    notifier.ready(status=status)


class Counters(Protocol):
    """What `status_loop` reads: metrics.Stats has both."""

    clients_connected: int
    updates_published: int


def status_text(clients: int, updates_per_s: float) -> str:
    """The STATUS= line: ``12 clients, 1.0 updates/s``."""
    noun = "client" if clients == 1 else "clients"
    return f"{clients} {noun}, {updates_per_s:.1f} updates/s"


async def status_loop(
    notifier: Notifier,
    counters: Counters,
    every: float = STATUS_EVERY,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Send STATUS= with connected clients and the update rate over the last `every` seconds,
    every `every` seconds, forever; cancel to stop. Sleeps only when systemd is absent."""
    task_status.started()
    if not notifier.enabled:
        await trio.sleep_forever()
    last_time = trio.current_time()
    last_updates = counters.updates_published
    while True:
        await trio.sleep(every)
        now, updates = trio.current_time(), counters.updates_published
        rate = (updates - last_updates) / (now - last_time) if now > last_time else 0.0
        notifier.status(status_text(counters.clients_connected, rate))
        last_time, last_updates = now, updates
