"""What the generator and `simulate` are told to do: plain, frozen parameter types.

`market/` knows nothing of the config file: `settings.GeneratorSettings.spec()` validates the
`[generator]` table and builds a `GeneratorSpec` from it, with every symbol's model already
scaled to the bar (per-bar `params.ModelParams`). Tests and tools may build one directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .params import ModelKind, ModelParams, VolumeParams

SourceKind = Literal["synthetic", "file", "replay"]


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """One synthetic symbol: its model, per-bar parameters, starting price and volume."""

    model: ModelKind
    params: ModelParams
    initial_price: float
    volume: VolumeParams


@dataclass(frozen=True, slots=True)
class FitSpec:
    """The GARCH(1,1) fit behind `data.garch_forecast`."""

    enabled: bool = True
    window: int = 500
    refit_every: int = 100
    horizon: int = 10


@dataclass(frozen=True, slots=True)
class FileSourceSpec:
    """Follow a JSON array or JSON Lines file written by another process."""

    path: Path | None = None
    format: Literal["auto", "json", "jsonl"] = "auto"
    poll_interval: float = 0.5


@dataclass(frozen=True, slots=True)
class ReplaySourceSpec:
    """Replay a CSV of OHLCV bars at `speed` × real time."""

    path: Path | None = None
    speed: float = 1.0
    loop: bool = True


@dataclass(frozen=True, slots=True)
class GeneratorSpec:
    """Where bars come from and what is computed on them.

    `symbol_specs` holds the `SymbolSpec` of each configured symbol and `default_symbol` that
    of any other name (no overrides), when `source` is synthetic (empty and None otherwise: external
    sources have no model). `bar_seconds_set` says whether `bar_seconds` was
    configured rather than defaulted to `interval` (a file's inferred spacing is compared only
    with a configured one)."""

    source: SourceKind
    interval: float
    symbols: tuple[str, ...]
    model: ModelKind
    seed: int | None
    bar_seconds: float
    seconds_per_year: float
    volatility_window: int
    ewma_lambda: float
    substeps: int
    warmup_bars: int
    symbol_specs: Mapping[str, SymbolSpec] = field(default_factory=dict)
    default_symbol: SymbolSpec | None = None
    garch_fit: FitSpec = FitSpec()
    file: FileSourceSpec = FileSourceSpec()
    replay: ReplaySourceSpec = ReplaySourceSpec()
    bar_seconds_set: bool = False

    def symbol(self, symbol: str) -> SymbolSpec:
        """The synthetic parameters of `symbol` (any name: one without overrides gets
        `default_symbol`); KeyError for an external source."""
        found = self.symbol_specs.get(symbol, self.default_symbol)
        if found is None:
            raise KeyError(f"{symbol}: no synthetic model with source = {self.source!r}")
        return found
