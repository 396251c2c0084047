"""The browser module's pure parts (static/client.js: backoffDelay, StreamState, closeVerdict),
run in Node.js: no socket, no clock, no browser. Its behaviour against a real daemon, in Chromium,
is tests/test_client_js_browser.py.

Each case is a small ES module that imports the very file the daemon serves and prints JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agentspoonsd.client import backoff_delay

MODULE = (
    Path(__file__).resolve().parents[1] / "daemon" / "agentspoonsd" / "dashboard" / "static"
) / "client.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")


def js(body: str) -> Any:
    """Runs `body` (which ends with `return VALUE`) with the module's exports in scope as `m`."""
    script = (
        f"import * as m from {json.dumps(MODULE.as_uri())};\n"
        f"const result = (() => {{ {body} }})();\n"
        "process.stdout.write(JSON.stringify(result));\n"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_backoff_is_the_python_clients_formula_in_milliseconds() -> None:
    cases = [
        (attempt, r) for attempt in (0, 1, 2, 3, 5, 6, 10, 64, 70, 1000) for r in (0, 0.5, 0.999)
    ]
    got = js(f"return {json.dumps(cases)}.map(([a, r]) => m.backoffDelay(a, 500, 30000, () => r));")
    want = [backoff_delay(a, 0.5, 30.0, lambda r=r: r) * 1000 for a, r in cases]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
    # Full jitter: anywhere from 0 up to the ceiling, never the ceiling itself.
    assert js("return [m.backoffDelay(3, 500, 30000, () => 0), m.backoffDelay(0)];")[0] == 0
    assert 0 <= js("return m.backoffDelay(0);") < 500
    errors = js(
        "return [[-1, 500, 1], [0, -1, 1], [0, 1, -1], [NaN, 1, 1]].map(([a, i, x]) => {"
        " try { m.backoffDelay(a, i, x); return null; } catch (e) { return e.name; } });"
    )
    assert errors == ["RangeError"] * 4


def test_updates_are_delivered_once_in_seq_order_and_a_jump_is_a_gap() -> None:
    verdicts = js(
        "const s = new m.StreamState({ symbols: ['BTC/USD'] });"
        "const v = [[ 'BTC/USD', 10 ], [ 'BTC/USD', 11 ], [ 'BTC/USD', 11 ], [ 'BTC/USD', 5 ],"
        " [ 'BTC/USD', 13 ], [ 'BTC/USD', 12 ], [ 'ETH/USD', 1 ]].map(([x, q]) => s.accept(x, q));"
        "return [v, s.resumePositions()];"
    )
    assert verdicts == [
        ["deliver", "deliver", "duplicate", "duplicate", "gap", "deliver", "unwanted"],
        {"BTC/USD": 12},  # a gap is not recorded: the next connection resumes before it
    ]
    # Every symbol wanted, and positions to start from (e.g. kept by an earlier page).
    assert js(
        "const s = new m.StreamState({ resume: { 'ETH/USD': 7, 'X': 1.5 } });"
        "return [s.accept('ETH/USD', 7), s.accept('ETH/USD', 9), s.accept('SOL/USD', 3)];"
    ) == ["duplicate", "gap", "deliver"]


def test_a_reset_restarts_the_symbol_at_the_oldest_seq() -> None:
    assert js(
        "const s = new m.StreamState({ symbols: ['BTC/USD'] });"
        "s.accept('BTC/USD', 100);"
        "const previous = s.reset('BTC/USD', 40);"
        "return [previous, s.accept('BTC/USD', 39), s.accept('BTC/USD', 40), s.reset('N', 5)];"
    ) == [100, "duplicate", "deliver", None]


def test_the_connect_url_resumes_known_symbols_and_names_the_fresh_ones() -> None:
    urls = js(
        "const s = new m.StreamState({ symbols: ['BTC/USD', 'ETH/USD'] });"
        "const base = 'ws://127.0.0.1:8765/?symbols=X&access_token=old&keep=a%20b';"
        "const first = s.connectUrl(base, 'to k&en');"
        "s.accept('BTC/USD', 41);"
        "const all = new m.StreamState({ resume: { 'BTC/USD': 41 } });"
        "return [first, s.connectUrl(base, 'tok'), s.connectUrl('wss://h/', 'tok', 300),"
        " all.connectUrl('ws://h:1', null), new m.StreamState().connectUrl('ws://h:1/', 't')];"
    )
    assert urls == [
        "ws://127.0.0.1:8765/?keep=a%20b&access_token=to%20k%26en&symbols=BTC%2FUSD,ETH%2FUSD",
        "ws://127.0.0.1:8765/?keep=a%20b&access_token=tok&symbols=ETH%2FUSD&resume=BTC%2FUSD:41",
        # With history to load first, fresh symbols are asked for after `connected`.
        "wss://h/?access_token=tok&symbols=&resume=BTC%2FUSD:41",
        "ws://h:1/?symbols=&resume=BTC%2FUSD:41",
        "ws://h:1/?access_token=t&symbols=",
    ]


def test_after_connected_the_missing_symbols_are_loaded_or_subscribed() -> None:
    connected = {"symbols": ["BTC/USD"], "available": ["BTC/USD", "ETH/USD", "SOL/USD"]}
    plans = js(
        f"const c = {json.dumps(connected)};"
        "const all = new m.StreamState({ resume: { 'BTC/USD': 4, 'OLD/USD': 9, 'SOL/USD': 2 } });"
        "const some = new m.StreamState({ symbols: ['ETH/USD', 'NOPE', 'BTC/USD'] });"
        "return [all.afterConnected(c, 300), all.resumePositions(), some.afterConnected(c, 0),"
        " some.afterConnected(c, 10)];"
    )
    assert plans == [
        {"history": ["ETH/USD"], "subscribe": [], "resume": {"SOL/USD": 2}},
        {"BTC/USD": 4, "SOL/USD": 2},  # OLD/USD is no longer the token's: forgotten
        {"history": [], "subscribe": ["ETH/USD"], "resume": {}},
        {"history": ["ETH/USD"], "subscribe": [], "resume": {}},
    ]


def test_subscribe_and_unsubscribe_change_what_is_wanted() -> None:
    assert js(
        "const s = new m.StreamState({ symbols: ['A'] });"
        "s.accept('A', 1);"
        "const added = [s.subscribe(['A', 'B']), s.subscribe(['B'])];"
        "const removed = s.unsubscribe(['A', 'C']);"
        "const all = new m.StreamState();"
        "const fromAll = [all.subscribe(['A']), all.unsubscribe(['B'], ['A', 'B', 'C'])];"
        "return [added, removed, s.resumePositions(), s.accept('A', 2), s.accept('A', 9),"
        " fromAll, all.accept('B', 1), all.accept('C', 1)];"
    ) == [[["B"], []], ["A"], {}, "unwanted", "unwanted", [[], ["B"]], "unwanted", "deliver"]


@pytest.mark.parametrize(
    ("facts", "verdict"),
    [
        ({"code": 4001, "opened": True}, {"stop": "revoked"}),
        ({"code": 4001, "opened": False}, {"stop": "revoked"}),
        ({"code": 1001, "opened": True}, {"retry": "lost"}),
        ({"code": 1006, "opened": True}, {"retry": "lost"}),
        ({"code": 1006, "opened": False, "daemonAnswers": False}, {"retry": "down"}),
        (
            {"code": 1006, "opened": False, "daemonAnswers": True, "refusals": 1},
            {"retry": "refused"},
        ),
        (
            {"code": 1006, "opened": False, "daemonAnswers": True, "refusals": 2},
            {"stop": "refused"},
        ),
        (
            {"code": 1006, "opened": False, "daemonAnswers": True, "refusals": 5},
            {"stop": "refused"},
        ),
    ],
)
def test_close_verdicts(facts: dict[str, Any], verdict: dict[str, str]) -> None:
    assert js(f"return m.closeVerdict({json.dumps(facts)});") == verdict
