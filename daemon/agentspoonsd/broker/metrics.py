"""Prometheus exposition of a redis broker node: is Redis reachable, does this node generate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .service import RedisBroker


class BrokerCollector(Collector):
    """Read at scrape time from the running `RedisBroker`."""

    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        broker = self._broker
        yield GaugeMetricFamily(
            "agentspoonsd_broker_connected",
            "1 while this node reaches Redis, 0 while it does not.",
            value=1.0 if broker.link.connected else 0.0,
        )
        yield GaugeMetricFamily(
            "agentspoonsd_broker_leader",
            "1 while this node holds the lease and generates.",
            value=1.0 if broker.leading else 0.0,
        )
        yield CounterMetricFamily(
            "agentspoonsd_broker_disconnects",
            "Times this node lost Redis (one per outage, as logged).",
            value=broker.link.outages,
        )
        yield CounterMetricFamily(
            "agentspoonsd_broker_terms",
            "Times this node was elected to generate.",
            value=broker.terms,
        )
