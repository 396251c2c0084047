"""Bookkeeping of the fan-out workers (``[server] workers`` > 1): pure, no processes or sockets.

- how many workers `"auto"` means;
- what each worker is configured with (`WorkerConfig`): the master's tokens and limits, with
  the connection limits split evenly across the workers (each worker enforces its share: a
  limit of 1,000 over 4 workers is 250 per worker, rounded up, so the total can exceed the
  configured value by at most workers - 1);
- the counters the workers report, summed into the master's `Stats` for /metrics and systemd's
  STATUS= line, with what workers that died had counted kept (counters never go backwards);
- which worker gets each connection the master accepts (`Placement`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, overload

from .auth import TokenSpec
from .limits import Limits
from .metrics import Stats

# The counters a worker keeps (its clients); the master keeps the rest (updates published,
# its services' restarts, its reloads).
WORKER_COUNTERS = (
    "connections_accepted",
    "messages_sent",
    "bytes_sent",
    "client_errors",
    "backlog_overflows",
)
WORKER_LABELLED = ("auth_failures", "rejected_upgrades", "disconnects", "floods")


def worker_count(setting: int | str, cpus: int | None = None) -> int:
    """The number of workers `[server] workers` asks for: `"auto"` is the cores this process
    may run on (at least 1)."""
    if setting == "auto":
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            cpus = cpus or os.cpu_count() or 1
        return max(1, cpus)
    return int(setting)


@overload
def share(total: int, workers: int) -> int: ...
@overload
def share(total: None, workers: int) -> None: ...
@overload
def share(total: int | None, workers: int) -> int | None: ...
def share(total: int | None, workers: int) -> int | None:
    """One worker's share of a limit over `workers` (rounded up, at least 1); None: no limit."""
    if total is None:
        return None
    return max(1, -(-total // workers))


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker serves with; sent at its start and after each reload the master applied.

    Everything a worker knows of the config comes from here: a worker never reads the config
    file, so a file edited since the master read it cannot give two workers two configs."""

    tokens: tuple[TokenSpec, ...]
    auth_enabled: bool
    limits: Limits
    tls_files: tuple[str, str] | None  # (certificate, key) for wss://, read by the worker
    log_level: str
    log_format: str
    symbols: tuple[str, ...]
    history_size: int

    def dump(self) -> bytes:
        """The bytes of the `config` message. pickle, because `Limits` holds parsed networks
        and frozensets: it only ever travels from a master to the workers it started from the
        same executable, over a socketpair no other process holds."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def load(raw: bytes) -> WorkerConfig:
        config = pickle.loads(raw)  # see dump
        if not isinstance(config, WorkerConfig):
            raise TypeError(f"not a WorkerConfig: {type(config).__name__}")
        return config


def worker_config(
    tokens: Iterable[TokenSpec],
    auth_enabled: bool,
    limits: Limits,
    tls_files: tuple[str, str] | None,
    log_level: str,
    workers: int,
    *,
    log_format: str = "json",
    symbols: tuple[str, ...] = (),
    history_size: int = 1000,
) -> WorkerConfig:
    """The config of each of `workers` workers: `max_connections`, `max_connections_per_ip` and
    every token's `max_connections` split evenly (see `share`); everything else as given."""
    split_limits = dataclasses.replace(
        limits,
        max_connections=share(limits.max_connections, workers),
        max_connections_per_ip=share(limits.max_connections_per_ip, workers),
    )
    split_tokens = tuple(
        dataclasses.replace(t, max_connections=share(t.max_connections, workers)) for t in tokens
    )
    return WorkerConfig(
        split_tokens,
        auth_enabled,
        split_limits,
        tls_files,
        log_level,
        log_format,
        tuple(symbols),
        history_size,
    )


@dataclass
class StatsBook:
    """The newest counters of each running worker and the totals of the ones that ended."""

    current: dict[int, dict[str, Any]] = field(default_factory=dict)  # slot → its last report
    clients: dict[int, int] = field(default_factory=dict)  # slot → connected clients
    subscribers: dict[int, int] = field(default_factory=dict)  # slot → hub subscribers
    _retired: Stats = field(default_factory=Stats)

    def report(self, slot: int, stats: dict[str, Any], subscribers: int) -> None:
        """A worker's report: its own counters since it started (they only grow)."""
        self.current[slot] = stats
        self.clients[slot] = int(stats.get("clients_connected", 0))
        self.subscribers[slot] = subscribers

    def retire(self, slot: int) -> None:
        """The worker in `slot` ended: keep what it counted, drop its clients."""
        last = self.current.pop(slot, None)
        self.clients.pop(slot, None)
        self.subscribers.pop(slot, None)
        if last is not None:
            _add(self._retired, last)

    def count_own(self, name: str, label: str) -> None:
        """Count an event of the master's own under a worker counter (a `/ws` connection no
        worker could take): kept with the retired totals, so `merge_into` keeps it."""
        counter: Counter[str] = getattr(self._retired, name)
        counter[label] += 1

    def merge_into(self, stats: Stats) -> None:
        """Set the worker counters of `stats` (the master's) to the sum over all workers ever."""
        total = Stats()
        _add(total, report_fields(self._retired))
        for report in self.current.values():
            _add(total, report)
        for name in WORKER_COUNTERS:
            setattr(stats, name, getattr(total, name))
        for name in WORKER_LABELLED:
            setattr(stats, name, getattr(total, name))
        stats.clients_connected = sum(self.clients.values())

    def subscriber_count(self) -> int:
        return sum(self.subscribers.values())


def report_fields(stats: Stats) -> dict[str, Any]:
    """A worker's counters as its `stats` report carries them (JSON: labels as strings)."""
    report: dict[str, Any] = {name: getattr(stats, name) for name in WORKER_COUNTERS}
    for name in WORKER_LABELLED:
        report[name] = {str(k): v for k, v in getattr(stats, name).items()}
    report["clients_connected"] = stats.clients_connected
    return report


def _add(total: Stats, report: dict[str, Any]) -> None:
    for name in WORKER_COUNTERS:
        setattr(total, name, getattr(total, name) + int(report.get(name, 0)))
    for name in WORKER_LABELLED:
        counter: Counter[str] = getattr(total, name)
        counter.update({str(k): int(v) for k, v in (report.get(name) or {}).items()})


class Placement:
    """Which worker gets the next connection: the ready one with the fewest clients, counting
    those handed to it that it has not taken yet (a worker reports its clients and how many
    connections it has taken, once a second; a storm in between is spread by what was handed).
    Ties go to the lowest slot.

    Counting, not turns: a worker that restarts empty takes the new connections until it has
    as many as the others, instead of staying behind for good.
    """

    def __init__(self) -> None:
        self._clients: dict[int, int] = {}  # as last reported
        self._taken: dict[int, int] = {}  # handed connections taken, as last reported
        self._handed: dict[int, int] = {}  # handed to the current worker, in all

    def reported(self, slot: int, clients: int, taken: int) -> None:
        self._clients[slot] = clients
        self._taken[slot] = taken

    def handed(self, slot: int) -> None:
        self._handed[slot] = self._handed.get(slot, 0) + 1

    def forget(self, slot: int) -> None:
        """The worker in `slot` ended: its replacement starts from nothing."""
        for table in (self._clients, self._taken, self._handed):
            table.pop(slot, None)

    def load(self, slot: int) -> int:
        """The clients of `slot`'s worker, those still on their way to it included."""
        queued = self._handed.get(slot, 0) - self._taken.get(slot, 0)
        return self._clients.get(slot, 0) + max(0, queued)

    def pick(self, ready: Iterable[int]) -> int | None:
        """The slot to hand the next connection to, among `ready`; None when empty."""
        return min(ready, key=lambda slot: (self.load(slot), slot), default=None)
