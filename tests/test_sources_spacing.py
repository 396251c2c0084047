"""market/spacing.py: a source's bar length and session gaps, from its timestamps. Pure.

The expected values are worked out by hand from the rules (median of the recent positive
spacings; a gap is more than 1.5 × the median known before it; the configured length within 5 %).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agentspoonsd.market.spacing import (
    GAP_FACTOR,
    MIN_SPACINGS,
    RECENT_SPACINGS,
    Spacing,
    SpacingTracker,
)

T0 = datetime(2025, 3, 3, 14, 31, tzinfo=UTC)  # a Monday, 09:31 in New York


def stamps(*seconds: float) -> list[datetime]:
    return [T0 + timedelta(seconds=s) for s in seconds]


def observe_all(tracker: SpacingTracker, times: list[datetime]) -> list[Spacing]:
    return [tracker.observe(t) for t in times]


def every(step: float, count: int, start: float = 0.0) -> list[float]:
    return [start + step * k for k in range(count)]


def test_the_configured_length_holds_until_two_spacings_are_known() -> None:
    tracker = SpacingTracker(60.0)
    first, second, third, fourth = observe_all(tracker, stamps(*every(300, 4)))
    assert first == Spacing(60.0, None, None, False)
    assert second == Spacing(60.0, None, None, False)  # one spacing: not yet
    assert third == Spacing(300.0, 300.0, None, True)  # two: inferred, and it contradicts
    assert fourth == Spacing(300.0, 300.0, None, False)  # said once, not again
    assert tracker.inferred_seconds == 300.0


def test_a_matching_spacing_keeps_the_configured_float_and_never_mismatches() -> None:
    tracker = SpacingTracker(60.0)
    results = observe_all(tracker, stamps(*every(60, 200)))
    assert all(r.bar_seconds == 60.0 and not r.mismatch and r.gap_seconds is None for r in results)
    assert results[-1].inferred_seconds == 60.0


@pytest.mark.parametrize(
    ("spacing", "used"),
    [
        (57.0, 60.0),  # 5 % below: within the tolerance
        (63.0, 60.0),  # 5 % above
        (56.9, 56.9),  # just beyond
        (63.1, 63.1),
        (120.0, 120.0),
        (1.0, 1.0),
    ],
)
def test_the_inferred_length_is_used_beyond_five_percent(spacing: float, used: float) -> None:
    tracker = SpacingTracker(60.0)
    results = observe_all(tracker, stamps(*every(spacing, 10)))
    assert results[-1].bar_seconds == pytest.approx(used, rel=1e-12)
    assert any(r.mismatch for r in results) is (used != 60.0)


def test_jittered_timestamps_do_not_move_the_configured_length() -> None:
    # Bars stamped when a feed happened to write them: 60 s ± 1.5 s.
    offsets = [0.0]
    for k in range(1, 100):
        offsets.append(60.0 * k + (1.5 if k % 3 == 0 else -1.0 if k % 3 == 1 else 0.4))
    results = observe_all(SpacingTracker(60.0), stamps(*offsets))
    assert {r.bar_seconds for r in results} == {60.0}
    assert not any(r.mismatch or r.gap_seconds for r in results)


def test_the_median_ignores_gaps_and_the_gap_is_reported() -> None:
    # Two US equity sessions of one-minute bars: 09:31 .. 16:00, then 09:31 the next day.
    day = every(60, 390)
    times = stamps(*day, *(86400 + d for d in day))  # 16:00 -> 09:31: 17 h 31 min
    results = observe_all(SpacingTracker(60.0), times)
    gaps = [(k, r.gap_seconds) for k, r in enumerate(results) if r.gap_seconds is not None]
    assert gaps == [(390, 17.5 * 3600 + 60)]
    assert {r.bar_seconds for r in results} == {60.0}
    assert results[390].inferred_seconds == 60.0  # the gap is one spacing among 64: no effect


def test_weekends_in_daily_bars_are_gaps_and_the_day_stays_the_bar() -> None:
    day = 86400.0
    weekdays = [d for d in range(40) if d % 7 < 5]  # Monday .. Friday
    results = observe_all(SpacingTracker(day), stamps(*(d * day for d in weekdays)))
    gaps = [r.gap_seconds for r in results if r.gap_seconds is not None]
    assert gaps == [3 * day] * 5  # every Monday after the first week's
    assert {r.bar_seconds for r in results} == {day}


def test_a_gap_is_more_than_one_and_a_half_bars() -> None:
    base = every(60, 5)
    exactly = observe_all(SpacingTracker(60.0), stamps(*base, base[-1] + GAP_FACTOR * 60))
    assert exactly[-1].gap_seconds is None
    beyond = observe_all(SpacingTracker(60.0), stamps(*base, base[-1] + 90.000001))
    assert beyond[-1].gap_seconds == pytest.approx(90.000001, abs=1e-9)


def test_no_gap_is_reported_before_the_spacing_is_known() -> None:
    # The first spacings cannot be told from a bar of unknown length.
    results = observe_all(SpacingTracker(60.0), stamps(0, 3600, 3660, 3720, 3780, 30000))
    assert [r.gap_seconds for r in results] == [None, None, None, None, None, 26220.0]
    # With two spacings (3600, 60) the median was their mean for a while: annualisation follows.
    assert results[2].bar_seconds == 1830.0 and results[2].mismatch
    assert results[4].bar_seconds == 60.0  # median of (3600, 60, 60, 60)


def test_a_series_whose_spacing_changes_is_followed() -> None:
    minute = every(60, 100)
    five = every(300, 100, start=minute[-1] + 300)
    results = observe_all(SpacingTracker(60.0), stamps(*minute, *five))
    # The first five-minute spacings look like gaps until they are the majority of the recent.
    switched = [k for k, r in enumerate(results) if r.bar_seconds == 300.0]
    assert switched and switched[0] == 100 + RECENT_SPACINGS // 2
    assert switched == list(range(switched[0], 200))
    # Just before, the median was half way (180 s); from the switch on nothing is a gap.
    assert results[switched[0] - 1].bar_seconds == 180.0
    assert all(r.gap_seconds is None for r in results[switched[0] + 1 :])
    assert [r.mismatch for r in results].count(True) == 1


def test_a_timestamp_that_goes_back_is_no_spacing() -> None:
    # A replay that started over: the series continues, the spacing is unchanged.
    times = stamps(*every(300, 5), *every(300, 5))
    results = observe_all(SpacingTracker(60.0), times)
    assert [r.gap_seconds for r in results] == [None] * 10
    assert all(r.bar_seconds == 300.0 for r in results[2:])
    repeated = observe_all(SpacingTracker(60.0), stamps(0, 300, 600, 600, 900))
    assert repeated[3].inferred_seconds == repeated[4].inferred_seconds == 300.0


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    results = observe_all(SpacingTracker(60.0), stamps(0, 100, 300, 600, 1000))
    assert [r.inferred_seconds for r in results] == [None, None, 150.0, 200.0, 250.0]


def test_spacings_are_exact_in_microseconds() -> None:
    # 1 ms bars over a year of offsets: no float rounding in the spacings themselves.
    times = [T0 + timedelta(days=365, microseconds=1000 * k) for k in range(5)]
    results = observe_all(SpacingTracker(0.001), times)
    assert [r.inferred_seconds for r in results[2:]] == [0.001] * 3
    assert not any(r.mismatch for r in results)


def test_only_the_recent_spacings_count() -> None:
    tracker = SpacingTracker(60.0, recent=4, min_spacings=MIN_SPACINGS)
    results = observe_all(tracker, stamps(0, 10, 20, 30, 40, 100, 160, 220))
    # After 100: spacings (10, 10, 10, 60) -> 10; after 160: (10, 10, 60, 60) -> 35; then 60.
    assert [r.inferred_seconds for r in results[4:]] == [10.0, 10.0, 35.0, 60.0]
    assert results[5].gap_seconds == 60.0 and results[6].gap_seconds == 60.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"configured_seconds": 0.0},
        {"configured_seconds": -1.0},
        {"configured_seconds": float("inf")},
        {"configured_seconds": float("nan")},
        {"configured_seconds": 60.0, "min_spacings": 0},
        {"configured_seconds": 60.0, "recent": 2, "min_spacings": 3},
        {"configured_seconds": 60.0, "gap_factor": 1.0},
        {"configured_seconds": 60.0, "tolerance": -0.01},
        {"configured_seconds": 60.0, "tolerance": 1.0},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    configured = kwargs.pop("configured_seconds")
    with pytest.raises(ValueError):
        SpacingTracker(configured, **kwargs)  # type: ignore[arg-type]
