"""The health routes: readiness rules (pure) and the handler's answers."""

from __future__ import annotations

import orjson
from prometheus_client import CollectorRegistry

from agentspoonsd.health import Probes, make_handler, readiness
from agentspoonsd.metrics import Stats, make_registry


def probes(listening: bool = True, age: float | None = 0.5, interval: float = 2.0) -> Probes:
    return Probes(lambda: listening, lambda: age, lambda: interval)


def test_ready_when_listening_and_fresh() -> None:
    assert readiness(probes()) == (True, [])


def test_not_ready_before_the_first_update() -> None:
    ready, reasons = readiness(probes(age=None))
    assert not ready and reasons == ["no update published yet"]


def test_not_ready_when_the_newest_update_is_older_than_three_intervals() -> None:
    assert readiness(probes(age=5.9, interval=2.0))[0]
    ready, reasons = readiness(probes(age=6.1, interval=2.0))
    assert not ready and "6.1 s old" in reasons[0]


def test_not_ready_when_the_listener_is_down() -> None:
    ready, reasons = readiness(probes(listening=False, age=None))
    assert not ready and len(reasons) == 2


def test_handler_routes() -> None:
    stats = Stats(clients_connected=3)
    stats.auth_failures["invalid_token"] += 2
    handle = make_handler(probes(age=None), make_registry(stats, lambda: None))
    assert handle("GET", "/healthz").status == 200
    not_ready = handle("GET", "/readyz?verbose=1")
    assert not_ready.status == 503
    assert orjson.loads(not_ready.body)["status"] == "not_ready"
    metrics = handle("GET", "/metrics")
    assert metrics.content_type.startswith("text/plain; version=0.0.4")
    text = metrics.body.decode()
    assert "agentspoonsd_clients_connected 3.0" in text
    assert 'agentspoonsd_auth_failures_total{reason="invalid_token"} 2.0' in text
    assert "agentspoonsd_last_update_age_seconds NaN" in text
    assert handle("GET", "/nope").status == 404


def test_registry_is_private() -> None:
    registry = make_registry(Stats(), lambda: 1.0)
    assert isinstance(registry, CollectorRegistry)
    from prometheus_client import REGISTRY

    assert "agentspoonsd_clients_connected" not in {m.name for m in REGISTRY.collect()}
