"""Counters the daemon keeps, and their Prometheus exposition.

The hot path only increments plain integers on `Stats`; nothing is locked or allocated per
message. A prometheus_client collector reads them when /metrics is scraped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
) -> CollectorRegistry:
    """A private registry (never the global default one) holding our collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, last_update_age, subscribers))
    return registry
