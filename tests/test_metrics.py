"""The /metrics exposition: the process collector, build info, readiness, the generator interval
and the watchdog's pets, as a scraper reads them (parsed with prometheus_client's own parser)."""

from __future__ import annotations

import platform
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentspoonsd import __version__
from agentspoonsd.metrics import Stats, make_registry, render
from agentspoonsd.sdnotify import PetLog


def samples(registry_text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) → value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(registry_text.decode())
        for sample in family.samples
    }


def test_process_metrics_describe_this_process() -> None:
    got = samples(render(make_registry(Stats(), lambda: None)))
    assert got[("process_open_fds", ())] >= 3
    assert got[("process_resident_memory_bytes", ())] > 1_000_000
    assert got[("process_cpu_seconds_total", ())] > 0
    # A Unix time, not seconds since boot, and no later than now.
    assert 1_600_000_000 < got[("process_start_time_seconds", ())] <= time.time()


def test_build_info_names_the_version_and_python() -> None:
    got = samples(render(make_registry(Stats(), lambda: None)))
    labels = (("python", platform.python_version()), ("version", __version__))
    assert got[("agentspoonsd_build_info", labels)] == 1.0


def test_ready_and_interval_are_read_at_scrape_time() -> None:
    state = {"ready": False, "interval": 1.0}
    registry = make_registry(
        Stats(), lambda: None, ready=lambda: state["ready"], interval=lambda: state["interval"]
    )
    got = samples(render(registry))
    assert got[("agentspoonsd_ready", ())] == 0.0
    assert got[("agentspoonsd_generator_interval_seconds", ())] == 1.0
    state.update(ready=True, interval=0.25)  # a SIGHUP reload changes the interval
    got = samples(render(registry))
    assert got[("agentspoonsd_ready", ())] == 1.0
    assert got[("agentspoonsd_generator_interval_seconds", ())] == 0.25


def test_watchdog_pets_near_misses_and_timeout() -> None:
    pets = PetLog(timeout=20.0)
    for now in (0.0, 10.0, 20.0, 36.0):  # 16 s > 0.75 × 20 s: a near miss
        pets.record(now)
    got = samples(render(make_registry(Stats(), lambda: None, watchdog=pets)))
    assert got[("agentspoonsd_watchdog_timeout_seconds", ())] == 20.0
    assert got[("agentspoonsd_watchdog_pets_total", ())] == 4.0
    assert got[("agentspoonsd_watchdog_near_misses_total", ())] == 1.0
    assert got[("agentspoonsd_watchdog_longest_gap_seconds", ())] == 16.0


def test_without_a_watchdog_the_series_exist_at_zero() -> None:
    """Outside systemd the watchdog series are still there (timeout 0: no watchdog), so a rule
    or a dashboard panel over them is valid on every node."""
    got = samples(render(make_registry(Stats(), lambda: None, watchdog=PetLog(timeout=None))))
    assert got[("agentspoonsd_watchdog_timeout_seconds", ())] == 0.0
    assert got[("agentspoonsd_watchdog_near_misses_total", ())] == 0.0


def test_pet_log_counts_gaps_past_three_quarters_of_the_timeout() -> None:
    pets = PetLog(timeout=10.0)
    assert pets.record(100.0) is None  # the first pet has no gap
    assert pets.record(105.0) == 5.0 and pets.near_misses == 0
    assert pets.record(112.5) == 7.5 and pets.near_misses == 0  # exactly 0.75: not yet
    assert pets.record(120.1) == pytest.approx(7.6)
    assert pets.near_misses == 1 and pets.pets == 4
    assert pets.longest_gap == pytest.approx(7.6)


def test_pet_log_without_a_timeout_counts_no_near_miss() -> None:
    pets = PetLog(timeout=None)
    for now in (0.0, 1000.0, 5000.0):
        pets.record(now)
    assert pets.pets == 3 and pets.near_misses == 0 and pets.longest_gap == 4000.0
