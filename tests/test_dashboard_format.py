"""The dashboard's pure modules (static/format.js: time conventions, tick labels, numbers, CSV;
static/series.js: a symbol's window of bars, its liveness, the stream's rate and latency), run in
Node.js: no DOM, no socket, no clock. The page itself in Chromium: tests/test_dashboard_page.py.

All the cases run in one Node.js process (one module printing a JSON object of results), so the
file costs one start of Node.js.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

STATIC = Path(__file__).resolve().parents[1] / "daemon" / "agentspoonsd" / "dashboard" / "static"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")

# Each case: a name and a function body (with `f`: format.js, `s`: series.js) returning JSON.
CASES = {
    "parse_micro": "return f.parseTime('2026-04-12T14:33:05.123456Z');",
    "parse_offset": "return f.parseTime('2026-04-12T16:33:05+02:00');",
    "parse_bad": "return [f.parseTime('yesterday'), f.parseTime(null), f.parseTime(42)];",
    # 2026-04-12T23:59:50Z and ticks every 5 s, then every 5 min, then daily.
    "ticks_seconds": "return f.tickLabels([1776038390, 1776038395, 1776038400], 5, 'utc');",
    "ticks_minutes": "return f.tickLabels([1776038100, 1776038400], 300, 'utc');",
    "ticks_days": "return f.tickLabels([1776038400, 1776124800], 86400, 'utc');",
    "title_one_day": "return f.axisTitle(1776038000, 1776038390, 'utc');",
    "title_midnight": "return f.axisTitle(1776038390, 1776038410, 'utc');",
    "title_empty": "return f.axisTitle(null, null, 'utc');",
    "timestamp": "return f.formatTimestamp(1776038390.25, 'utc');",
    "clock": "return f.formatClock(1776038390.25, 'utc');",
    "local_zone": "return f.zoneName('local', 0);",
    "currency": ("return ['BTC/USD', 'ETH-EUR', 'eth_usdt', 'SPX', 'A/B/C'].map(f.quoteCurrency);"),
    "missing": (
        "return [f.formatPrice(null), f.formatPercent(undefined), f.formatNumber(null, 4),"
        " f.formatChange(NaN), f.formatAge(null)];"
    ),
    "numbers": (
        "return [f.formatPrice(50123.456), f.formatPrice(1.2345678), f.formatPercent(0.47912),"
        " f.formatChange(0.0123), f.formatChange(-0.004), f.formatAge(0.42), f.formatAge(75),"
        " f.formatAge(7300)];"
    ),
    "change": "return [f.change(100, 101), f.change(0, 5), f.change(null, 5)];",
    "median": "return [f.median([3, 1, 2]), f.median([4, 1, 3, 2]), f.median([null, NaN])];",
    "sort_desc_missing_last": (
        "const rows = [['a', 2], ['b', null], ['c', 5], ['d', 2]];"
        " return f.sortRows(rows, (r) => r[1], -1, (r) => r[0]).map((r) => r[0]);"
    ),
    "sort_asc_missing_last": (
        "const rows = [['a', 2], ['b', null], ['c', 5], ['d', 2]];"
        " return f.sortRows(rows, (r) => r[1], 1, (r) => r[0]).map((r) => r[0]);"
    ),
    "sort_strings": (
        "return f.sortRows(['ETH/USD', 'BTC/USD', 'ADA/USD'], (r) => r, 1, (r) => r);"
    ),
    "csv": (
        "return f.toCsv(['a', 'b,c'], [[1, null], ['say \"hi\"', 'x\\ny'], [undefined, 0.1]]);"
    ),
    "file_safe": "return f.fileSafe('BTC/USD 1');",
    "window_refuses_backwards": (
        "const w = new s.BarWindow(10);"
        " return [w.push({t: 10}), w.push({t: 10}), w.push({t: 9}), w.push({t: 11}), w.bars];"
    ),
    "window_breaks_a_hole": (
        "const w = new s.BarWindow(10);"
        " const verdicts = [0, 1, 2, 3, 10, 11].map((t) => w.push({t}));"
        " return {verdicts, points: w.points.map((p) => [p.t, !!p.gap]), bars: w.bars,"
        " close: w.column((p) => p.t)};"
    ),
    "window_trims": (
        "const w = new s.BarWindow(3);"
        " for (const t of [0, 1, 2, 3, 10, 11]) w.push({t});"
        " return {points: w.points.map((p) => [p.t, !!p.gap]), bars: w.bars,"
        " only: w.barsOnly().map((p) => p.t)};"
    ),
    "bar_from_partial_update": (
        "return s.barFromUpdate({timestamp: '2026-04-12T00:00:00Z', seq: 3, price: 5,"
        " estimators: {close_to_close: 0.01, parkinson: null},"
        " estimators_annualized: {close_to_close: 0.5},"
        " garch_forecast: {volatility_1: 0.02, volatility_cum_h: 0.07}}, 50);"
    ),
    "bar_from_empty_update": "return s.barFromUpdate({});",
    "annualize": (
        "return [s.annualizeFactor({estimators: {close_to_close: 0.01},"
        " estimators_annualized: {close_to_close: 0.5}}),"
        " s.annualizeFactor({estimators: {close_to_close: 0, ewma: 0.02},"
        " estimators_annualized: {close_to_close: 0, ewma: 0.4}}),"
        " s.annualizeFactor({})];"
    ),
    "liveness": (
        "const l = new s.Liveness(3);"
        " const before = [l.ageSeconds(0), l.isStale(0, 1)];"
        " for (const t of [0, 200, 400, 600]) l.arrive(t);"
        " return {before, interval: l.intervalSeconds(), age: l.ageSeconds(1000),"
        " at1100: l.isStale(1100), at1300: l.isStale(1300)};"
    ),
    "liveness_bursts_and_history": (
        "const l = new s.Liveness(3);"
        " l.arrive(0, false); l.arrive(0, false);"
        " const history = [l.intervalSeconds(2), l.isStale(7000, 2), l.isStale(9000, 2)];"
        " for (const t of [1000, 3000, 3000, 5000, 7000]) l.arrive(t);"
        " return {history, interval: l.intervalSeconds(9)};"
    ),
    "meter": (
        "const m = new s.StreamMeter(10000);"
        " const first = m.rate(0);"
        " for (let t = 0; t < 20000; t += 100) m.record(t, (t - 30) / 1000);"
        " return {first, rate: m.rate(20000), latency: m.latencyMs()};"
    ),
}


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    cases = ",\n".join(f"{json.dumps(name)}: () => {{ {body} }}" for name, body in CASES.items())
    script = (
        f"import * as f from {json.dumps((STATIC / 'format.js').as_uri())};\n"
        f"import * as s from {json.dumps((STATIC / 'series.js').as_uri())};\n"
        f"const cases = {{ {cases} }};\n"
        "const out = {};\n"
        "for (const [name, run] of Object.entries(cases)) {\n"
        "  try { out[name] = run(); } catch (e) { out[name] = {error: String(e)}; }\n"
        "}\n"
        "process.stdout.write(JSON.stringify(out));\n"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"TZ": "Asia/Kolkata", "PATH": "/usr/bin:/bin"},  # local time differs from UTC
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_times_keep_their_microseconds_and_offsets(results: dict[str, Any]) -> None:
    assert results["parse_micro"] == pytest.approx(1776004385.123456, abs=1e-6)
    assert results["parse_offset"] == 1776004385
    assert results["parse_bad"] == [None, None, None]


def test_tick_labels_have_one_format_per_axis_and_no_glued_date(results: dict[str, Any]) -> None:
    assert results["ticks_seconds"] == ["23:59:50", "23:59:55", "00:00:00"]
    assert results["ticks_minutes"] == ["23:55", "00:00"]
    assert results["ticks_days"] == ["04-13", "04-14"]


def test_the_date_lives_in_the_axis_title(results: dict[str, Any]) -> None:
    assert results["title_one_day"] == "time (UTC) · 2026-04-12"
    assert results["title_midnight"] == "time (UTC) · 2026-04-12 – 2026-04-13"
    assert results["title_empty"] == "time (UTC)"


def test_tables_and_notices_use_the_same_utc_convention(results: dict[str, Any]) -> None:
    assert results["timestamp"] == "2026-04-12 23:59:50.250 UTC"
    assert results["clock"] == "23:59:50 UTC"
    assert results["local_zone"] == "local, UTC+05:30"  # TZ=Asia/Kolkata


def test_quote_currency_comes_from_the_symbol(results: dict[str, Any]) -> None:
    assert results["currency"] == ["USD", "EUR", "USDT", None, None]


def test_missing_values_are_a_dash_never_zero(results: dict[str, Any]) -> None:
    assert results["missing"] == ["—"] * 5


def test_numbers(results: dict[str, Any]) -> None:
    assert results["numbers"] == [
        "50,123.46",
        "1.234568",
        "47.91 %",
        "+1.23 %",
        "−0.40 %",
        "0.4 s",
        "1 min 15 s",
        "2 h 01 min",
    ]
    assert results["change"][0] == pytest.approx(0.01)
    assert results["change"][1:] == [None, None]
    assert results["median"] == [2, 2.5, None]


def test_sorting_puts_missing_values_last_either_way(results: dict[str, Any]) -> None:
    assert results["sort_desc_missing_last"] == ["c", "a", "d", "b"]
    assert results["sort_asc_missing_last"] == ["a", "d", "c", "b"]
    assert results["sort_strings"] == ["ADA/USD", "BTC/USD", "ETH/USD"]


def test_csv_quotes_what_needs_quoting(results: dict[str, Any]) -> None:
    assert results["csv"] == 'a,"b,c"\r\n1,\r\n"say ""hi""","x\ny"\r\n,0.1\r\n'
    assert results["file_safe"] == "BTC-USD-1"


def test_window_refuses_a_bar_that_does_not_move_time_forward(results: dict[str, Any]) -> None:
    assert results["window_refuses_backwards"] == ["added", "refused", "refused", "added", 2]


def test_window_breaks_the_line_across_a_hole_in_time(results: dict[str, Any]) -> None:
    case = results["window_breaks_a_hole"]
    assert case["verdicts"] == ["added"] * 4 + ["after-gap", "added"]
    breaks = [[0, False], [1, False], [2, False], [3, False], [4, True], [10, False], [11, False]]
    assert case["points"] == breaks
    assert case["close"][4] is None  # the chart's column has a null there: no line drawn
    assert case["bars"] == 6


def test_window_keeps_its_size_and_never_starts_with_a_break(results: dict[str, Any]) -> None:
    case = results["window_trims"]
    assert case["points"] == [[10, False], [11, False]]  # the break went with the bar before it
    assert case["bars"] == 2 and case["only"] == [10, 11]


def test_bars_take_what_an_update_has_and_null_for_the_rest(results: dict[str, Any]) -> None:
    bar = results["bar_from_partial_update"]
    assert bar["close"] == 5 and bar["seq"] == 3 and bar["open"] is None
    assert bar["perBar"] == [0.01, None, None, None, None, None]
    assert bar["annual"][0] == 0.5
    assert bar["garch1Annual"] == 1.0 and bar["garchCumH"] == 0.07 and bar["garchH"] is None
    empty = results["bar_from_empty_update"]
    assert empty["t"] is None and empty["close"] is None and empty["perBar"] == [None] * 6
    assert results["annualize"] == [50, 20, None]


def test_liveness_measures_the_interval_and_calls_three_missed_stale(
    results: dict[str, Any],
) -> None:
    case = results["liveness"]
    assert case["before"] == [None, False]
    assert case["interval"] == pytest.approx(0.2)
    assert case["age"] == pytest.approx(0.4)
    assert case["at1100"] is False  # 0.5 s without an update: under 3 × 0.2 s
    assert case["at1300"] is True


def test_liveness_ignores_history_bursts_and_catch_up(results: dict[str, Any]) -> None:
    case = results["liveness_bursts_and_history"]
    # The fallback until live updates are measured, with a grace for the first live one.
    assert case["history"] == [2, False, True]
    assert case["interval"] == 2  # a burst of two (a daemon catching up) does not halve it


def test_stream_meter_rate_and_latency(results: dict[str, Any]) -> None:
    case = results["meter"]
    assert case["first"] is None
    assert case["rate"] == pytest.approx(10.0, rel=0.02)  # 99 or 100 in the 10 s span
    assert case["latency"] == pytest.approx(30.0)
