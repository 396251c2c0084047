"""`agentspoonsd simulate` (market/simulate.py and the CLI subcommand).

The key property: simulate writes the very records the daemon publishes for the same settings,
bit for bit (GARCH refits included), timestamps too for a daemon run that starts at simulate's
`start`. The daemon side is the real `Generator` service on Trio (virtual clock), its GARCH fits
in worker threads.
"""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import structlog
import trio
import trio.testing

from agentspoonsd import configpaths
from agentspoonsd import settings as settings_module
from agentspoonsd.cli import main
from agentspoonsd.market import annual, models
from agentspoonsd.market.bar import Bar
from agentspoonsd.market.estimators import ESTIMATOR_NAMES
from agentspoonsd.market.generator import Generator, symbol_seed
from agentspoonsd.market.records import parse_replay_csv
from agentspoonsd.market.simulate import simulate, write_jsonl
from agentspoonsd.protocol import iso_utc, update_data
from agentspoonsd.settings import GeneratorSettings

EX_CONFIG = 78
START = datetime(2025, 1, 1, tzinfo=UTC)
DATA_KEYS = [
    "timestamp",
    "symbol",
    "seq",
    "volatility",
    "price",
    "returns",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "bar_seconds",
    "gap_seconds",
    "estimators",
    "estimators_annualized",
    "estimators_quality",
    "garch_forecast",
]
CSV_HEADER = [
    "timestamp",
    "symbol",
    "seq",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "returns",
    "volatility",
    "close_to_close",
    "ewma",
    "parkinson",
    "garman_klass",
    "rogers_satchell",
    "yang_zhang",
    "window",
    "garch_status",
    "garch_variance_1",
    "garch_variance_h",
]


def without(record: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in keys}


async def daemon_bars(settings: GeneratorSettings, count: int) -> list[list[Bar]]:
    """`count` batches from the real Generator service (warm-up and fits in worker threads),
    its run starting at the wall-clock time START."""
    send, receive = trio.open_memory_channel[list[Bar]](0)
    generator = Generator(settings.spec(), send, structlog.get_logger(), wall_clock=lambda: START)
    batches = []
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        for _ in range(count):
            batches.append(await receive.receive())
        nursery.cancel_scope.cancel()
    return batches


# --- the same records as the daemon --------------------------------------------------------------


@pytest.mark.parametrize(("model", "steps"), [("garch", 300), ("gbm", 150), ("gjr_garch", 150)])
async def test_simulate_writes_what_the_daemon_publishes(
    autojump_clock: trio.testing.MockClock, model: str, steps: int
) -> None:
    settings = GeneratorSettings(
        symbols=["BTC/USD", "ETH/USD"],
        model=model,  # type: ignore[arg-type]
        overrides={"ETH/USD": {"model": "heston", "initial_price": 2500.0}},
        seed=20250101,
        interval=1.0,
        bar_seconds=60.0,  # an accelerated market: the timestamps are market time, not wall time
        warmup_bars=130,  # fits during the warm-up too (warm-started from each other)
        volatility_window=12,
        garch_fit={"window": 100, "refit_every": 9, "horizon": 7},
    )
    batches = await daemon_bars(settings, steps)
    for index, symbol in enumerate(settings.symbols):
        published = [update_data(batch[index], k) for k, batch in enumerate(batches, start=1)]
        written = list(simulate(settings.spec(), symbol, steps, START))
        assert [r["seq"] for r in written] == list(range(1, steps + 1))
        assert [list(r) for r in written] == [DATA_KEYS] * steps
        for a, b in zip(published, written, strict=True):
            assert a == b
            # Bit for bit: orjson writes the shortest repr that round-trips each float.
            assert orjson.dumps(a) == orjson.dumps(b)
        forecasts = [r["garch_forecast"] for r in written]
        refits = sum(1 for f in forecasts if f["bars_since_fit"] == 0)
        assert refits >= 5, symbol  # several fits happened inside the compared stretch
        assert any(f["status"] == "ok" for f in forecasts)


def test_simulate_closes_bar_k_at_start_plus_k_minus_1_bars() -> None:
    # The warm-up (5 bars) takes no market time: update 1 closes at start, as a daemon's first.
    settings = GeneratorSettings(
        seed=1, warmup_bars=5, bar_seconds=0.25, garch_fit={"enabled": False}
    )
    start = datetime(2024, 2, 28, 23, 59, 59, 999_000, tzinfo=UTC)
    records = list(simulate(settings.spec(), "BTC/USD", 40, start))
    expected = [iso_utc(start + timedelta(seconds=0.25 * k)) for k in range(40)]
    assert [r["timestamp"] for r in records] == expected
    assert records[-1]["timestamp"] == "2024-02-29T00:00:09.749000Z"  # leap day crossed


def test_simulate_output_does_not_depend_on_other_symbols_or_zero_steps() -> None:
    base = {"seed": 4, "warmup_bars": 120, "garch_fit": {"window": 100, "refit_every": 10}}
    alone = list(simulate(GeneratorSettings(**base).spec(), "SOL/USD", 50, START))
    crowded = GeneratorSettings(**base, symbols=["BTC/USD", "SOL/USD", "XRP/USD"])
    assert list(simulate(crowded.spec(), "SOL/USD", 50, START)) == alone
    assert list(simulate(crowded.spec(), "SOL/USD", 0, START)) == []
    with pytest.raises(ValueError):
        list(simulate(crowded.spec(), "SOL/USD", -1, START))
    with pytest.raises(ValueError):
        list(simulate(crowded.spec(), "SOL/USD", 5, datetime(2025, 1, 1)))


# --- the CLI as real subprocesses ----------------------------------------------------------------


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


def agentspoonsd_command() -> list[str]:
    script = Path(sys.executable).parent / "agentspoonsd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agentspoonsd"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Every subprocess case at once (each interpreter start costs ~0.5 s)."""
    tmp = tmp_path_factory.mktemp("simulate")
    config = tmp / "agentspoonsd.toml"
    config.write_text(
        "[generator]\ninterval = 2.0\nbar_seconds = 60.0\nwarmup_bars = 200\n"
        "[generator.garch_fit]\nrefit_every = 50\n"
    )
    common = ["simulate", "--config", str(config), "--steps", "400"]
    cases = {
        "a": [*common, "--seed", "7"],
        "a_again": [*common, "--seed", "7"],
        "b": [*common, "--seed", "8"],
        "csv": [*common, "--seed", "7", "--format", "csv"],
        "bad_steps": [*common, "--steps", "-3"],
    }
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTSPOONSD_")}
    procs = {
        name: subprocess.Popen(
            [*agentspoonsd_command(), *args],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        results[name] = Result(proc.returncode, out, err.decode())
    return results


def check_data_object(record: dict[str, Any], symbol: str, seq: int) -> None:
    assert list(record) == DATA_KEYS
    assert record["symbol"] == symbol and record["seq"] == seq
    # One-minute bars published every 2 s: market time, exactly 60 s apart from --start on.
    assert datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")) == START + timedelta(
        minutes=seq - 1
    )
    for key in ("volatility", "price", "returns", "open", "high", "low", "close", "volume"):
        assert type(record[key]) is float, key
    assert record["low"] <= min(record["open"], record["close"])
    assert record["high"] >= max(record["open"], record["close"])
    assert record["volume"] >= 0 and record["price"] == record["close"]
    estimators = record["estimators"]
    assert list(estimators) == [*ESTIMATOR_NAMES, "window"]
    assert record["volatility"] == estimators["close_to_close"]
    annualized = record["estimators_annualized"]
    assert list(annualized) == list(estimators)
    for name in ESTIMATOR_NAMES:
        # 365 trading days of 60 s bars.
        assert annualized[name] == pytest.approx(estimators[name] * math.sqrt(525_600), rel=1e-14)
    assert record["garch_forecast"]["horizon"] == 10


def test_cli_writes_steps_json_lines_of_data_objects(cli_runs: dict[str, Result]) -> None:
    run = cli_runs["a"]
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 401  # exactly --steps lines, each terminated
    records = [orjson.loads(line) for line in lines[:-1]]
    previous_close = None
    for seq, record in enumerate(records, start=1):
        check_data_object(record, "BTC/USD", seq)
        if previous_close is not None:
            assert record["open"] == previous_close
            assert record["returns"] == pytest.approx(
                math.log(record["close"] / previous_close), rel=1e-12
            )
        previous_close = record["close"]
    assert {r["garch_forecast"]["status"] for r in records} <= {"ok", "nonstationary", "failed"}


def test_cli_same_seed_same_bytes_other_seed_other_bytes(cli_runs: dict[str, Result]) -> None:
    assert cli_runs["a"].stdout == cli_runs["a_again"].stdout
    assert cli_runs["b"].returncode == 0
    assert len(cli_runs["b"].stdout.splitlines()) == 400
    a = [orjson.loads(line)["close"] for line in cli_runs["a"].stdout.splitlines()]
    b = [orjson.loads(line)["close"] for line in cli_runs["b"].stdout.splitlines()]
    assert not set(a) & set(b)


def test_cli_csv_is_read_back_by_the_replay_parser(cli_runs: dict[str, Result]) -> None:
    run = cli_runs["csv"]
    assert run.returncode == 0, run.stderr
    records = [orjson.loads(line) for line in cli_runs["a"].stdout.splitlines()]
    rows = list(csv.reader(io.StringIO(run.stdout.decode())))
    assert rows[0] == CSV_HEADER
    assert len(rows) == 401
    parsed = parse_replay_csv(run.stdout, default_symbol="OTHER")
    assert parsed.rejected == []
    assert len(parsed.records) == 400
    for bar, record in zip(parsed.records, records, strict=True):
        assert bar.symbol == "BTC/USD"
        assert iso_utc(bar.timestamp) == record["timestamp"]
        assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == (
            record["open"],
            record["high"],
            record["low"],
            record["close"],
            record["volume"],
        )
    for row, record in zip(csv.DictReader(io.StringIO(run.stdout.decode())), records, strict=True):
        assert int(row["seq"]) == record["seq"]
        assert float(row["volatility"]) == record["volatility"]
        assert float(row["yang_zhang"]) == record["estimators"]["yang_zhang"]
        assert int(row["window"]) == record["estimators"]["window"]
        forecast = record["garch_forecast"]
        assert row["garch_status"] == forecast["status"]
        for column, key in (("garch_variance_1", "variance_1"), ("garch_variance_h", "variance_h")):
            assert (float(row[column]) if row[column] else None) == forecast[key]


def test_cli_bad_argument_exits_78_in_a_subprocess(cli_runs: dict[str, Result]) -> None:
    run = cli_runs["bad_steps"]
    assert run.returncode == EX_CONFIG
    assert run.stdout == b""
    assert "simulate" in run.stderr and "--steps" in run.stderr


# --- the CLI in process --------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No AGENTSPOONSD_* variable, no config file found by the search (cwd and /etc)."""
    for name in list(os.environ):
        if name.upper().startswith("AGENTSPOONSD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(configpaths, "DEFAULT_SEARCH_PATHS", ())
    return tmp_path


def run_cli(*args: str) -> int:
    return main(["simulate", *args])


def jsonl(records: Iterator[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def test_cli_output_is_simulate_of_the_effective_settings(workdir: Path) -> None:
    config = workdir / "c.toml"
    config.write_text(
        '[generator]\nsymbols = ["BTC/USD", "ETH/USD"]\nseed = 5\nwarmup_bars = 150\n'
        "volatility_window = 8\n[generator.garch_fit]\nwindow = 100\nrefit_every = 25\n"
    )
    out = workdir / "out.jsonl"
    assert (
        run_cli("--config", str(config), "--symbol", "ETH/USD", "--steps", "200", "-o", str(out))
        == 0
    )
    expected = GeneratorSettings(
        symbols=["BTC/USD", "ETH/USD"],
        seed=5,
        warmup_bars=150,
        volatility_window=8,
        garch_fit={"window": 100, "refit_every": 25},
    )
    assert out.read_bytes() == jsonl(simulate(expected.spec(), "ETH/USD", 200, START))
    # --seed overrides the file's seed; --start moves the timestamps only.
    assert run_cli("--config", str(config), "--seed", "6", "--steps", "20", "-o", str(out)) == 0
    reseeded = expected.model_copy(update={"seed": 6})
    assert out.read_bytes() == jsonl(simulate(reseeded.spec(), "BTC/USD", 20, START))
    start = "2026-06-01T12:00:00+02:00"
    assert run_cli("--config", str(config), "--steps", "20", "--start", start, "-o", str(out)) == 0
    moved = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    original = list(simulate(expected.spec(), "BTC/USD", 20, START))
    assert [without(r, "timestamp") for r in moved] == [without(r, "timestamp") for r in original]
    assert moved[0]["timestamp"] == "2026-06-01T10:00:00.000000Z"  # the first bar closes at start


@pytest.mark.parametrize(
    ("model", "yearly"),
    [
        ("heston", settings_module.HestonSettings()),
        ("gbm", settings_module.GbmSettings()),
        ("garch", settings_module.GarchModelSettings()),
    ],
)
def test_cli_model_and_symbol_choose_the_stream(
    workdir: Path, capsysbinary: pytest.CaptureFixture[bytes], model: str, yearly: Any
) -> None:
    # The configured model is gjr_garch for every symbol; --model switches DOGE/USD (not even
    # configured) to `model`. Without warm-up the bars are the model's first ones.
    config = workdir / "c.toml"
    config.write_text('[generator]\nmodel = "gjr_garch"\nwarmup_bars = 0\ninitial_price = 0.15\n')
    code = run_cli(
        "--config", str(config), "--model", model, "--symbol", "DOGE/USD", "--seed", "9",
        "--steps", "100",
    )  # fmt: skip
    assert code == 0
    records = [orjson.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert len(records) == 100 and {r["symbol"] for r in records} == {"DOGE/USD"}
    # The default yearly table at the default bar: interval = 2 s, a 365-day year.
    params = annual.per_bar_params(
        model,  # type: ignore[arg-type]
        yearly.model_dump(),
        annual.BarTime(bar_seconds=2.0, seconds_per_year=365 * 86400.0),
    )
    reference = models.make_model(
        model,  # type: ignore[arg-type]
        params,
        seed=symbol_seed(9, "DOGE/USD"),
        initial_price=0.15,
        volume=models.VolumeParams(),
        substeps=16,
    ).simulate(100)
    got = np.array([[r["open"], r["high"], r["low"], r["close"], r["volume"]] for r in records])
    want = np.column_stack(list(reference))
    assert np.array_equal(got, want)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--start", "yesterday"], "isoformat"),
        (["--start", "2025-01-01T00:00:00"], "--start needs a UTC offset"),
        (["--seed", "-1"], "seed"),
        (["--symbol", "*"], '"*" is not a symbol name'),
        (["--symbol", ""], "symbols.1"),
        (["--config", "missing.toml"], "missing.toml: config file not found"),
        (["--config", "bad.toml"], "generator.garch"),
        (["--config", "per_bar.toml"], "generator.gbm.sigma: unknown key"),
        (["--config", "inf.toml"], "generator.initial_price"),
    ],
)
def test_cli_bad_arguments_exit_78_with_a_message(
    workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (workdir / "bad.toml").write_text("[generator.garch]\nreaction = 1.5\n")
    (workdir / "inf.toml").write_text("[generator]\ninitial_price = inf\n")
    (workdir / "per_bar.toml").write_text("[generator.gbm]\nsigma = 0.0009\n")
    assert run_cli(*args) == EX_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("agentspoonsd: simulate: ")
    assert message in captured.err, captured.err


def test_write_jsonl_is_one_orjson_dumps_per_record_in_any_batch() -> None:
    """The batched serialisation splits one array at the records' boundaries: its bytes are
    those of a call per record, across batch edges (600 records: 3 batches of 256, a partial
    one), with the separator's text inside a string, and for records of another shape (the
    fallback: their first key is not ``timestamp``, or an array of objects inside a record
    holds the separator)."""
    spec = GeneratorSettings(
        seed=3, warmup_bars=5, garch_fit={"window": 100, "refit_every": 50}
    ).spec()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    records = list(simulate(spec, "BTC/USD", 600, start))
    records[7] = {**records[7], "symbol": 'X},{"timestamp":"Y'}
    others = [{"seq": i, "nested": [{"timestamp": i}, {"timestamp": i + 1}]} for i in range(300)]
    # One boundary without the separator, one separator inside a record: the count matches.
    compensating = [
        {"timestamp": 1, "nested": [{"timestamp": 2}, {"timestamp": 3}]},
        {"seq": 4},
    ]
    for batch in (records, others, compensating, records[:1], []):
        out = io.BytesIO()
        assert write_jsonl(iter(batch), out) == len(batch)
        expected = b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in batch)
        assert out.getvalue() == expected
        assert out.getvalue().count(b"\n") == len(batch)
