"""Counters the daemon keeps, and their Prometheus exposition.

The hot path only increments plain integers on `Stats`; nothing is locked or allocated per
message. A prometheus_client collector reads them when /metrics is scraped, next to the
standard `process_*` series (CPU, memory, file descriptors, start time) of prometheus_client's
process collector. Every series a rule or panel in monitoring/ uses is always present (a labelled
counter may have no sample yet, but its family is declared).
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .sdnotify import PetLog

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Stats:
    """Process-wide counters, owned by the daemon and passed to each service."""

    clients_connected: int = 0
    connections_accepted: int = 0
    updates_published: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    client_errors: int = 0
    backlog_overflows: int = 0
    auth_failures: Counter[str] = field(default_factory=Counter)
    rejected_upgrades: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)
    floods: Counter[str] = field(default_factory=Counter)
    service_restarts: Counter[str] = field(default_factory=Counter)
    config_reloads: Counter[str] = field(default_factory=Counter)


class StatsCollector(Collector):
    """Exposes `Stats` plus gauges computed at scrape time."""

    def __init__(
        self,
        stats: Stats,
        last_update_age: Callable[[], float | None],
        subscribers: Callable[[], int] | None = None,
    ) -> None:
        self._stats = stats
        self._last_update_age = last_update_age
        self._subscribers = subscribers

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        build = GaugeMetricFamily(
            "agentspoonsd_build_info",
            "Always 1; the labels name the daemon's version and the Python running it.",
            labels=["version", "python"],
        )
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build
        yield GaugeMetricFamily(
            "agentspoonsd_clients_connected",
            "WebSocket clients connected now.",
            value=s.clients_connected,
        )
        if self._subscribers is not None:
            yield GaugeMetricFamily(
                "agentspoonsd_subscribers",
                "Connections the hub writes updates to (subscribed to at least one symbol).",
                value=self._subscribers(),
            )
        yield _counter(
            "connections_accepted", "WebSocket upgrades accepted.", s.connections_accepted
        )
        yield _counter(
            "updates_published", "Updates broadcast (one per symbol per tick).", s.updates_published
        )
        yield _counter(
            "messages_sent", "Update frames handed to client write paths.", s.messages_sent
        )
        yield _counter(
            "bytes_sent", "Bytes of update frames handed to client write paths.", s.bytes_sent
        )
        yield _counter("client_errors", "Client messages answered with an error.", s.client_errors)
        yield _counter(
            "backlog_overflows",
            "Clients closed (1013) because their unread backlog passed max_backlog_bytes.",
            s.backlog_overflows,
        )
        yield _labelled(
            "auth_failures", "Upgrades refused for authentication.", "reason", s.auth_failures
        )
        yield _labelled(
            "rejected_upgrades", "Upgrades refused for any reason.", "reason", s.rejected_upgrades
        )
        yield _labelled(
            "disconnects", "Client connections ended, by reason.", "reason", s.disconnects
        )
        yield _labelled(
            "client_floods",
            "Clients closed (1008) for sending more frames or bytes per second than allowed.",
            "kind",
            s.floods,
        )
        yield _labelled(
            "service_restarts",
            "Supervised services restarted after a crash.",
            "service",
            s.service_restarts,
        )
        yield _labelled(
            "config_reloads", "SIGHUP reloads, by outcome.", "outcome", s.config_reloads
        )
        age = self._last_update_age()
        yield GaugeMetricFamily(
            "agentspoonsd_last_update_age_seconds",
            "Seconds since the newest update was published (NaN before the first).",
            value=float("nan") if age is None else age,
        )


class HealthCollector(Collector):
    """Readiness (as /readyz answers it), the generator interval and the systemd watchdog's pets,
    read at scrape time so a SIGHUP reload shows at once."""

    def __init__(
        self,
        ready: Callable[[], bool] | None,
        interval: Callable[[], float] | None,
        watchdog: PetLog | None,
    ) -> None:
        self._ready = ready
        self._interval = interval
        self._watchdog = watchdog

    def collect(self) -> Iterator[Metric]:
        if self._ready is not None:
            yield GaugeMetricFamily(
                "agentspoonsd_ready",
                "1 when /readyz answers 200 (listening, fresh updates, broker reachable), else 0.",
                value=1.0 if self._ready() else 0.0,
            )
        if self._interval is not None:
            yield GaugeMetricFamily(
                "agentspoonsd_generator_interval_seconds",
                "The configured seconds between two ticks ([generator] interval).",
                value=self._interval(),
            )
        pets = self._watchdog
        if pets is not None:
            yield GaugeMetricFamily(
                "agentspoonsd_watchdog_timeout_seconds",
                "systemd's watchdog timeout (WatchdogSec); 0 when there is no watchdog.",
                value=pets.timeout or 0.0,
            )
            yield _counter("watchdog_pets", "WATCHDOG=1 notifications sent.", pets.pets)
            yield _counter(
                "watchdog_near_misses",
                "Pets that came more than 3/4 of the watchdog timeout after the previous one.",
                pets.near_misses,
            )
            yield GaugeMetricFamily(
                "agentspoonsd_watchdog_longest_gap_seconds",
                "The longest gap between two pets since start (compare with the timeout).",
                value=pets.longest_gap,
            )


def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"agentspoonsd_{name}", doc, value=value)


def _labelled(name: str, doc: str, label: str, values: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"agentspoonsd_{name}", doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `registry`."""
    return generate_latest(registry)


def make_registry(
    stats: Stats,
    last_update_age: Callable[[], float | None],
    subscribers: Callable[[], int] | None = None,
    *,
    ready: Callable[[], bool] | None = None,
    interval: Callable[[], float] | None = None,
    watchdog: PetLog | None = None,
) -> CollectorRegistry:
    """A private registry (never the global default one) holding our collectors and the
    process collector (`process_*`, read from /proc at scrape time; absent where there is none).

    `ready`, `interval` and `watchdog` add `agentspoonsd_ready`, the generator interval and the
    `agentspoonsd_watchdog_*` series; the daemon always passes all three.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, last_update_age, subscribers))
    registry.register(HealthCollector(ready, interval, watchdog))
    ProcessCollector(registry=registry)
    return registry
