"""`agentspoonsd simulate`: the synthetic source offline, as fast as it goes.

The records are the daemon's: the same model, seed derivation, warm-up, pipeline and GARCH
refits (inline here, in a worker thread in the daemon, installed at the same bar either way).
The clock follows the daemon's rule (`clock.MarketClock`) for a run that starts at ``start``:
update ``k`` (from 1) closes at ``start + (k - 1) × bar_seconds`` (to the microsecond; the
warm-up bars take no market time), so the output is a pure function of the config, the symbol,
``steps`` and ``start``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Literal

import numpy as np
import orjson

from .clock import bar_step
from .estimators import ESTIMATOR_NAMES
from .garch_fit import fit_garch11
from .generator import build_model, pipeline_config
from .pipeline import SymbolPipeline
from .spec import GeneratorSpec

# Bars per model call: larger than the daemon's block (nothing waits on it here); the output does
# not depend on it (models and estimators are exactly block-size invariant).
SIMULATE_BLOCK = 16_384

CSV_COLUMNS = (
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
    *ESTIMATOR_NAMES,
    "window",
    "garch_status",
    "garch_variance_1",
    "garch_variance_h",
)


def simulate(
    spec: GeneratorSpec, symbol: str, steps: int, start: datetime
) -> Iterator[dict[str, Any]]:
    """Yield the `data` object of updates 1..steps of `symbol`, as the daemon would publish them
    after its warm-up. `start` must be timezone-aware."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if start.utcoffset() is None:
        raise ValueError("start must be timezone-aware")
    model = build_model(spec, symbol)
    pipeline = SymbolPipeline(symbol, pipeline_config(spec))
    origin = np.datetime64(start.astimezone(UTC).replace(tzinfo=None), "us")
    bar_us = np.timedelta64(bar_step(spec.bar_seconds) // timedelta(microseconds=1), "us")
    warmup = spec.warmup_bars
    total = warmup + steps
    done = 0
    while done < total:
        block = model.simulate(min(SIMULATE_BLOCK, total - done))
        pipeline.feed(block)
        # The block's timestamps, formatted at once: iso_utc's format, microseconds and a Z.
        seqs = np.arange(done - warmup + 1, done - warmup + 1 + block.n_bars)
        stamps = [s + "Z" for s in np.datetime_as_string(origin + (seqs - 1) * bar_us, unit="us")]
        for seq, stamp in zip(seqs.tolist(), stamps, strict=True):
            window = pipeline.advance()
            if window is not None:
                pipeline.install(fit_garch11(window, previous=pipeline.last_fit))
            if seq >= 1:
                yield pipeline.data(stamp, seq)
        done += block.n_bars


def write_jsonl(records: Iterator[dict[str, Any]], out: IO[bytes]) -> int:
    """One JSON object per line (orjson's compact form, keys in order); returns the count."""
    count = 0
    batch: list[dict[str, Any]] = []
    for record in records:
        batch.append(record)
        if len(batch) >= _JSONL_BATCH:
            out.write(_json_lines(batch))
            count += len(batch)
            batch.clear()
    out.write(_json_lines(batch))
    return count + len(batch)


_JSONL_BATCH = 256  # records per orjson call (bench/README.md: larger ones were slower)
_RECORD_SEPARATOR = b'},{"timestamp":'
_LINE_SEPARATOR = b'}\n{"timestamp":'


def _json_lines(batch: list[dict[str, Any]]) -> bytes:
    """``batch`` as JSON Lines, byte for byte what one ``orjson.dumps`` per record gives.

    One call for the whole batch (about twice as fast as a call per record): the array
    ``[{...},{...}]`` becomes lines by splitting at ``},{"timestamp":``. When every record's
    first key is ``timestamp`` (as the updates' data is) that text is at each of the
    ``len(batch) - 1`` boundaries, and anywhere else only in an array of objects inside a record
    (inside a string orjson writes the quote as ``\\"``); so exactly ``len(batch)`` pieces mean
    the pieces are the records. Otherwise (records of another shape) each record is serialised
    on its own. Split and join: one scan, where a replace and a count of the lines would be two.
    """
    if not batch:
        return b""
    if not all(next(iter(record), None) == "timestamp" for record in batch):
        return b"".join([orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in batch])
    pieces = orjson.dumps(batch)[1:-1].split(_RECORD_SEPARATOR)
    if len(pieces) == len(batch):
        return _LINE_SEPARATOR.join(pieces) + b"\n"
    return b"".join([orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in batch])


def write_csv(records: Iterator[dict[str, Any]], out: IO[bytes]) -> int:
    """A flat CSV (`CSV_COLUMNS`) that the replay source reads back; returns the count."""
    text = io.TextIOWrapper(out, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for data in records:
        estimators = data["estimators"]
        forecast = data["garch_forecast"]
        writer.writerow(
            (
                data["timestamp"],
                data["symbol"],
                data["seq"],
                repr(data["open"]),
                repr(data["high"]),
                repr(data["low"]),
                repr(data["close"]),
                repr(data["volume"]),
                _cell(data["returns"]),
                _cell(data["volatility"]),
                *(_cell(estimators[name]) for name in ESTIMATOR_NAMES),
                estimators["window"],
                forecast["status"],
                _cell(forecast["variance_1"]),
                _cell(forecast["variance_h"]),
            )
        )
        count += 1
    text.flush()
    text.detach()
    return count


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)


Format = Literal["jsonl", "csv"]
