"""The `[generator]` table and its sub-tables: sources, models in yearly units, estimators.

`GeneratorSettings.spec()` turns a validated table into the plain `market.spec.GeneratorSpec`
the generator runs on; `market/` itself never sees these models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..market import annual, params
from ..market.params import ModelKind
from ..market.spec import FileSourceSpec, FitSpec, GeneratorSpec, ReplaySourceSpec, SymbolSpec
from .base import Section as _Section


class _MarketSection(_Section):
    """A [generator] table: every number must be finite. TOML has inf and nan, and `gt=0`
    alone lets inf through (initial_price = inf, bar_seconds = inf, speed = inf...), which the
    models and the pipeline would refuse only when the daemon starts."""

    model_config = ConfigDict(allow_inf_nan=False)


# Half-lives at which the yearly defaults give today's per-bar defaults on 1-minute bars:
# 0.5 ** (60 / 2058.6) = 0.98000 (GARCH alpha + beta), ln 2 × 60 / 2079.4 = 0.020000 (Heston kappa).
_GARCH_HALF_LIFE = 2058.6
_HESTON_HALF_LIFE = 2079.4
_HALF_LIFE = "Market seconds in which a variance shock halves (persistence in time, not in bars)."
_ANNUAL_VOLATILITY = "Long-run volatility of the log price per year (0.65 = 65 %/year)."


def _check_yearly(kind: ModelKind, table: BaseModel) -> None:
    """Build the per-bar model at 1-minute bars in a 365-day year, so the rules that do not
    depend on the bar length (stationarity of the shares, Feller-free ranges...) are reported
    under the table's key when the config is loaded; the bar-dependent ones are checked by
    GeneratorSettings with the configured bar."""
    try:
        annual.per_bar_params(kind, table.model_dump(), _REFERENCE_BAR)
    except annual.YearlyParamError as exc:
        if exc.key != "half_life":  # depends on the bar: GeneratorSettings reports it
            raise ValueError(str(exc)) from None


_REFERENCE_BAR = annual.BarTime(bar_seconds=60.0, seconds_per_year=365 * 86400.0)


class ModelTable(_MarketSection):
    """A model's parameters, per year. `RETIRED` maps the per-bar keys of earlier versions to
    the key that replaces each, for the message that refuses them."""

    RETIRED: ClassVar[dict[str, str]] = {}


class GbmSettings(ModelTable):
    """Geometric Brownian motion, in yearly units (scaled to the bar: `market.annual`)."""

    RETIRED: ClassVar[dict[str, str]] = {"mu": "annual_drift", "sigma": "annual_volatility"}

    annual_volatility: float = Field(0.65, gt=0, description=_ANNUAL_VOLATILITY)
    annual_drift: float = Field(0.0, description="Drift of the log price per year.")

    @model_validator(mode="after")
    def _valid(self) -> GbmSettings:
        _check_yearly("gbm", self)
        return self


class GarchModelSettings(ModelTable):
    """GARCH(1,1) with Student-t innovations, in yearly units (scaled to the bar)."""

    RETIRED: ClassVar[dict[str, str]] = {
        "omega": "annual_volatility",
        "alpha": "reaction",
        "beta": "half_life",
    }

    annual_volatility: float = Field(0.65, gt=0, description=_ANNUAL_VOLATILITY)
    half_life: float = Field(_GARCH_HALF_LIFE, gt=0, description=_HALF_LIFE)
    reaction: float = Field(
        0.3518,
        ge=0,
        le=1,
        description=(
            "Reaction to the last squared return: alpha = reaction × sqrt(1 − p²), p the"
            " per-bar persistence; the kurtosis of returns is finite below 1/sqrt(E[z⁴] − 1)"
            " (0.53 for nu = 8), at every bar length."
        ),
    )
    nu: float = Field(8.0, gt=2, description="Degrees of freedom of the Student-t innovations.")

    @model_validator(mode="after")
    def _valid(self) -> GarchModelSettings:
        _check_yearly("garch", self)
        return self


class GjrGarchSettings(ModelTable):
    """GJR-GARCH(1,1): GARCH plus a leverage term for negative returns, in yearly units."""

    RETIRED: ClassVar[dict[str, str]] = {
        "omega": "annual_volatility",
        "alpha": "reaction",
        "gamma": "leverage",
        "beta": "half_life",
    }

    annual_volatility: float = Field(0.65, gt=0, description=_ANNUAL_VOLATILITY)
    half_life: float = Field(_GARCH_HALF_LIFE, gt=0, description=_HALF_LIFE)
    reaction: float = Field(
        0.1508,
        ge=0,
        description="Reaction to any squared return: alpha = reaction × sqrt(1 − p²).",
    )
    leverage: float = Field(
        0.2513,
        description=(
            "Extra reaction to a negative return: gamma = leverage × sqrt(1 − p²);"
            " reaction + leverage >= 0, reaction + leverage / 2 <= 1."
        ),
    )
    nu: float = Field(8.0, gt=2, description="Degrees of freedom of the Student-t innovations.")

    @model_validator(mode="after")
    def _valid(self) -> GjrGarchSettings:
        _check_yearly("gjr_garch", self)
        return self


class HestonSettings(ModelTable):
    """Heston stochastic volatility, in yearly units (scaled to the bar)."""

    RETIRED: ClassVar[dict[str, str]] = {
        "kappa": "half_life",
        "theta": "annual_volatility",
        "xi": "vol_of_vol",
        "v0": "initial_volatility",
        "mu": "annual_drift",
    }

    annual_volatility: float = Field(
        0.65, gt=0, description="Square root of the long-run variance per year."
    )
    half_life: float = Field(
        _HESTON_HALF_LIFE,
        gt=0,
        description=(
            "Market seconds in which the variance reverts halfway to its long run; at least"
            " ln 2 × bar_seconds."
        ),
    )
    vol_of_vol: float = Field(
        78.84,
        ge=0,
        description="Volatility of the annual variance, per sqrt(year) (Feller: 2·k·V̄ >= it²).",
    )
    rho: float = Field(-0.4, ge=-1, le=1, description="Correlation of price and variance shocks.")
    initial_volatility: float | None = Field(
        None, ge=0, description="Initial volatility per year; unset: annual_volatility."
    )
    annual_drift: float = Field(0.0, description="Drift of the log price per year.")

    @model_validator(mode="after")
    def _valid(self) -> HestonSettings:
        _check_yearly("heston", self)
        return self


class VolumeSettings(_MarketSection):
    """Bar volume: lognormal around a level that rises with the bar's absolute return."""

    scale: float = Field(1.0, gt=0, description="Typical volume of one bar.")
    dispersion: float = Field(0.5, ge=0, description="Standard deviation of log volume.")


class SymbolOverride(_MarketSection):
    """`[generator.overrides."SYMBOL"]`: what differs for one symbol."""

    model: ModelKind | None = None
    initial_price: float | None = Field(None, gt=0)
    annual_volatility: float | None = Field(
        None,
        gt=0,
        description=(
            "Long-run volatility per year of this symbol, whatever its model: replaces the"
            " model table's annual_volatility. Unset: the table's."
        ),
    )
    gbm: GbmSettings | None = None
    garch: GarchModelSettings | None = None
    gjr_garch: GjrGarchSettings | None = None
    heston: HestonSettings | None = None
    volume: VolumeSettings | None = None

    @model_validator(mode="after")
    def _one_volatility(self) -> SymbolOverride:
        if self.annual_volatility is None:
            return self
        for kind in params.MODEL_KINDS:
            table = getattr(self, kind)
            if table is not None and "annual_volatility" in table.model_fields_set:
                raise ValueError(
                    f"annual_volatility is set here and in {kind}: set it in one place, not both"
                )
        return self


class GarchFitSettings(_MarketSection):
    """[generator.garch_fit]: GARCH(1,1) maximum-likelihood fit behind `data.garch_forecast`."""

    enabled: bool = True
    window: int = Field(500, ge=100, le=100_000, description="Bars of returns in each fit.")
    refit_every: int = Field(100, ge=1, description="Bars between fits (run in a worker thread).")
    horizon: int = Field(10, ge=1, le=10_000, description="h of the h-step variance forecast.")


class FileSourceSettings(_MarketSection):
    """[generator.file]: follow a JSON array or JSON Lines file written by another process."""

    path: Path | None = Field(None, description='The file; required when source = "file".')
    format: Literal["auto", "json", "jsonl"] = Field(
        "auto", description="auto: .json is an array, .jsonl/.ndjson one record per line."
    )
    poll_interval: float = Field(0.5, gt=0, le=60, description="Seconds between checks.")


class ReplaySourceSettings(_MarketSection):
    """[generator.replay]: replay a CSV of OHLCV bars."""

    path: Path | None = Field(None, description='The CSV; required when source = "replay".')
    speed: float = Field(1.0, gt=0, description="Multiple of real time (60: a minute per second).")
    loop: bool = Field(True, description="Start over at the end (timestamps keep increasing).")


def _no_default(schema: dict[str, Any]) -> None:
    """The JSON schema of a key whose unset value is derived (shown without a default)."""
    schema.pop("default", None)


class GeneratorSettings(_MarketSection):
    """[generator]: where bars come from, and the analytics computed on them."""

    source: Literal["synthetic", "file", "replay"] = Field(
        "synthetic", description="synthetic: the models below; file or replay: external data."
    )
    interval: float = Field(2.0, gt=0, le=3600, description="Seconds between updates of a symbol.")
    symbols: list[Annotated[str, Field(min_length=1, max_length=32)]] = Field(
        default_factory=lambda: ["BTC/USD"], min_length=1
    )
    model: ModelKind = Field("garch", description="Simulation model of every symbol.")
    seed: int | None = Field(None, ge=0, description="Fixed seed: the same stream on every start.")
    initial_price: float = Field(50000.0, gt=0, description="Starting price of every symbol.")
    bar_seconds: float = Field(  # None: replaced by interval in the validator below
        None,
        ge=1e-6,
        validate_default=True,
        json_schema_extra=_no_default,  # not null: interval
        description=(
            "Market seconds one bar covers: bars are this far apart in data.timestamp, and the"
            " yearly model parameters and the annualisation use it. Unset: interval (real time);"
            " larger than interval: an accelerated market."
        ),
    )
    trading_days: float = Field(
        365.0, gt=0, le=366, description="Trading days per year, for annualised values."
    )
    session_hours: float = Field(
        24.0,
        gt=0,
        le=24,
        description="Trading hours per trading day (24: crypto; 6.5: US equities), for annualised"
        " values.",
    )
    volatility_window: int = Field(
        20, ge=2, le=10000, description="W: bars in every rolling estimator."
    )
    ewma_lambda: float = Field(0.94, gt=0, lt=1, description="Decay of the EWMA estimator.")
    substeps: int = Field(16, ge=1, le=1024, description="Intrabar path points per bar.")
    warmup_bars: int = Field(
        500, ge=0, le=1_000_000, description="Synthetic bars simulated before the first update."
    )
    gbm: GbmSettings = GbmSettings()
    garch: GarchModelSettings = GarchModelSettings()
    gjr_garch: GjrGarchSettings = GjrGarchSettings()
    heston: HestonSettings = HestonSettings()
    volume: VolumeSettings = VolumeSettings()
    overrides: dict[str, SymbolOverride] = Field(default_factory=dict)
    garch_fit: GarchFitSettings = GarchFitSettings()
    file: FileSourceSettings = FileSourceSettings()
    replay: ReplaySourceSettings = ReplaySourceSettings()

    @field_validator("symbols")
    @classmethod
    def _unique_symbols(cls, symbols: list[str]) -> list[str]:
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be unique")
        if "*" in symbols:
            raise ValueError('"*" is not a symbol name')
        return symbols

    @field_validator("bar_seconds", mode="before")
    @classmethod
    def _real_time_by_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        # Unset: one bar per interval, so the market clock is the wall clock. An invalid
        # interval has its own error; any valid number keeps this key quiet meanwhile.
        return info.data.get("interval", 1.0)

    @model_validator(mode="after")
    def _consistent(self) -> GeneratorSettings:
        unknown = sorted(set(self.overrides) - set(self.symbols))
        if unknown:
            listed = ", ".join(unknown)
            raise ValueError(f"overrides for symbols not in generator.symbols: {listed}")
        if self.source in ("file", "replay") and getattr(self, self.source).path is None:
            raise ValueError(f'source = "{self.source}" needs generator.{self.source}.path')
        if self.source == "synthetic":
            for symbol in self.symbols:
                self._yearly_problem(symbol)
        return self

    def _yearly_problem(self, symbol: str) -> None:
        """Raise ValueError naming the key when `symbol`'s yearly parameters make no valid
        model at this bar length (e.g. a Heston half_life shorter than ln 2 bars)."""
        try:
            self.params_for(symbol)
        except annual.YearlyParamError as exc:
            kind = self.model_for(symbol)
            override = self.overrides.get(symbol)
            table = f"{kind}"
            if override is not None and getattr(override, kind) is not None:
                table = f'overrides."{symbol}".{kind}'
            raise ValueError(f"{table}.{exc.key}: {exc.message}") from None

    @property
    def seconds_per_year(self) -> float:
        """Market seconds per year: ``trading_days × session_hours × 3600`` (annualised values
        are per-bar ones × sqrt(seconds_per_year / bar length))."""
        return self.trading_days * self.session_hours * 3600.0

    def model_for(self, symbol: str) -> ModelKind:
        override = self.overrides.get(symbol)
        return override.model if override and override.model else self.model

    @property
    def bar_time(self) -> annual.BarTime:
        """One bar and one year in market seconds: what the yearly parameters are scaled by."""
        return annual.BarTime(self.bar_seconds, self.seconds_per_year)

    def params_for(self, symbol: str) -> params.ModelParams:
        """The per-bar parameter dataclass of `symbol`'s model: its override table, else the
        default one, scaled from yearly units to `bar_seconds` (`market.annual`)."""
        kind = self.model_for(symbol)
        override = self.overrides.get(symbol)
        table = getattr(override, kind, None) or getattr(self, kind)
        yearly = table.model_dump()
        if override is not None and override.annual_volatility is not None:
            yearly["annual_volatility"] = override.annual_volatility
        return annual.per_bar_params(kind, yearly, self.bar_time)

    def volume_for(self, symbol: str) -> params.VolumeParams:
        override = self.overrides.get(symbol)
        table = override.volume if override and override.volume else self.volume
        return params.VolumeParams(**table.model_dump())

    def initial_price_for(self, symbol: str) -> float:
        override = self.overrides.get(symbol)
        if override and override.initial_price is not None:
            return override.initial_price
        return self.initial_price

    def spec(self) -> GeneratorSpec:
        """The plain `market.spec.GeneratorSpec` the generator and `simulate` run on: this
        table with every synthetic symbol's model scaled to `bar_seconds`."""
        symbol_specs = {}
        default_symbol = None
        if self.source == "synthetic":

            def symbol_spec(symbol: str) -> SymbolSpec:
                return SymbolSpec(
                    model=self.model_for(symbol),
                    params=self.params_for(symbol),
                    initial_price=self.initial_price_for(symbol),
                    volume=self.volume_for(symbol),
                )

            symbol_specs = {symbol: symbol_spec(symbol) for symbol in self.symbols}
            default_symbol = symbol_spec("")  # no override: the tables of [generator]
        return GeneratorSpec(
            source=self.source,
            interval=self.interval,
            symbols=tuple(self.symbols),
            model=self.model,
            seed=self.seed,
            bar_seconds=self.bar_seconds,
            seconds_per_year=self.seconds_per_year,
            volatility_window=self.volatility_window,
            ewma_lambda=self.ewma_lambda,
            substeps=self.substeps,
            warmup_bars=self.warmup_bars,
            symbol_specs=symbol_specs,
            default_symbol=default_symbol,
            garch_fit=FitSpec(**self.garch_fit.model_dump()),
            file=FileSourceSpec(**self.file.model_dump()),
            replay=ReplaySourceSpec(**self.replay.model_dump()),
            bar_seconds_set="bar_seconds" in self.model_fields_set,
        )
