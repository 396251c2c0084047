"""The daemon's configuration: pydantic models for every section, and how they are loaded.

The models are the documentation of the config: each field carries its default, its constraint and a
description. `load_settings` is the one place that reads a TOML file, applies
`AGENTSPOONSD_<SECTION>__<KEY>` environment overrides (`__` separates every level of a nested key:
`AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLED`) and turns every failure into a `ConfigError` whose
message names the key, where its value came from (the variable, or the file with the line and
column of the key), the value itself unless it may be a secret, and for an unknown key the
nearest real one.

Precedence, highest first: environment variables, the TOML file, the built-in defaults.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import types
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .auth import TokenSpec
from .httppolicy import PublicUrl, normalise_host
from .market import annual, params
from .market.params import ModelKind
from .market.spec import FileSourceSpec, FitSpec, GeneratorSpec, ReplaySourceSpec, SymbolSpec
from .proxies import parse_network
from .tomlfile import (
    MAX_CONFIG_BYTES,
    MAX_TOKENS_FILE_BYTES,
    FileRefused,
    file_kind,
    parse_toml,
    read_bounded,
)
from .tomlkeys import key_positions, locate

EXIT_CONFIG = 78  # sysexits EX_CONFIG: the daemon refuses to start on a bad configuration
ENV_PREFIX = "AGENTSPOONSD_"
CONFIG_ENV_VAR = "AGENTSPOONSD_CONFIG"
# Read by the clients (`watch`, `probe`, `agentspoonsd.client`), not settings: one shell may
# export them and run the daemon or read its config, so they are not taken for mistyped keys.
CLIENT_ENV_VARS = frozenset({"AGENTSPOONSD_TOKEN", "AGENTSPOONSD_URL"})
_NOT_SETTINGS = CLIENT_ENV_VARS | {CONFIG_ENV_VAR}
DEFAULT_SEARCH_PATHS = (
    Path("agentspoonsd.toml"),
    Path("/etc/agentspoonsd/agentspoonsd.toml"),
)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# RFC 3339 §5.6 date-time; the offset is optional here only to say precisely that it is missing.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$")
_EXPIRES_EXAMPLE = "2026-12-31T00:00:00Z"


class ConfigError(Exception):
    """The configuration cannot be used. The message is meant for the operator, as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `port = true` as 1; in a config file that is a mistake.
        annotation = cls.model_fields[info.field_name].annotation  # type: ignore[index]
        if isinstance(value, bool) and annotation in (int, float, int | None, float | None):
            raise ValueError("must be a number, not a boolean")
        return value


class ServerSettings(_Section):
    """[server]: the WebSocket listener."""

    host: str = Field("0.0.0.0", description="Address the WebSocket listener binds.")
    port: int = Field(8765, ge=0, le=65535, description="WebSocket port (0 picks a free one).")
    max_connections: int = Field(
        20000, ge=1, description="Connections served at once; upgrades past it get HTTP 503."
    )
    shutdown_timeout: float = Field(
        5.0, gt=0, description="Seconds to close every client (code 1001) and exit on SIGTERM."
    )
    handshake_timeout: float = Field(
        10.0, gt=0, description="Seconds a new connection has to complete its upgrade."
    )
    max_backlog_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Bytes queued for one slow client before it is closed with code 1013.",
    )
    send_buffer_bytes: int = Field(
        32 * 1024,
        ge=0,
        description=(
            "SO_SNDBUF of each client socket (Linux doubles it): what the kernel holds for a"
            " client that stops reading, before the max_backlog_bytes queue takes over; it also"
            " bounds one client's throughput to about twice this per round trip. 0: the"
            " kernel's autotuning (up to 4 MiB per client)."
        ),
    )
    max_message_size: int = Field(
        64 * 1024, ge=256, description="Largest client message accepted, in bytes."
    )
    listen_backlog: int = Field(
        16384,
        ge=1,
        description="Accept queue of the listening socket; Linux caps it at net.core.somaxconn.",
    )
    ping_interval: float = Field(
        20.0, gt=0, le=3600, description="Seconds between WebSocket pings to every client."
    )
    idle_timeout: float = Field(
        60.0, gt=0, description="Close (1001) a client from which nothing arrived this long."
    )
    max_client_messages_per_second: int = Field(
        20, ge=1, description="Client messages per second; more get `rate_limited` errors."
    )
    max_client_errors: int = Field(
        10, ge=1, description="Errors within 10 s before the client is closed with 1008."
    )
    max_client_frames_per_second: int = Field(
        1000,
        ge=10,
        description=(
            "WebSocket frames a client may send per second, pings, pongs and fragments included;"
            " past it the client is closed with 1008."
        ),
    )
    max_client_bytes_per_second: int = Field(
        4 << 20,
        ge=1024,
        description="Bytes a client may send per second; past it the client is closed with 1008.",
    )
    allowed_origins: list[str] | None = Field(
        None,
        description=(
            "Browser Origins that may connect (e.g. https://example.com); an upgrade with another"
            ' Origin gets 403. Unset: only the daemon\'s own dashboard. ["*"]: any.'
        ),
    )
    max_connections_per_ip: int | None = Field(
        None,
        ge=1,
        description=(
            "Connections from one address, handshakes in progress included; unset: no limit"
            " (429 past it)."
        ),
    )
    max_handshakes_per_ip: int | None = Field(
        1024,
        ge=1,
        description=(
            "Connections from one address (IPv6: one /64) that have not completed their upgrade;"
            " past it new ones get 429 and are closed at once. Unset: no limit."
        ),
    )
    permessage_deflate: bool = Field(
        True,
        description="Compress (RFC 7692) for clients that offer it; each update once for all.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "Reverse proxies (CIDRs or addresses, e.g. 10.0.0.0/8) whose forwarded_header is"
            " believed: from them, the client is the rightmost untrusted hop, for the"
            " per-address limits and the logs. Empty: the client is the socket's peer."
        ),
    )
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = Field(
        "x-forwarded-for",
        description=(
            "The one header trusted_proxies write (RFC 7239 `forwarded` or `x-forwarded-for`);"
            " the other is ignored, as a client could have sent it through the proxy."
        ),
    )
    public_url: str | None = Field(
        None,
        description=(
            "The URL at which clients reach the HTTP port through a reverse proxy, e.g."
            " https://example.com/market/: the dashboard connects to its `ws` (here"
            " wss://example.com/market/ws) and its origin may connect. Unset: the dashboard"
            " connects to /ws of the origin it was loaded from."
        ),
    )
    tls_cert: Path | None = Field(
        None,
        description=(
            "PEM certificate chain (leaf first); with tls_key the port serves wss:// (TLS 1.2+)."
            " Relative to the config file. Re-read on SIGHUP (new connections get the new one)."
        ),
    )
    tls_key: Path | None = Field(
        None,
        validate_default=True,
        description="Unencrypted PEM private key of tls_cert; set both or neither.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(parse_network(entry)) for entry in value]

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else PublicUrl.parse(value).url

    @field_validator("tls_key")
    @classmethod
    def _tls_both_or_neither(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert" not in info.data:
            return value  # tls_cert itself is invalid: that error is enough
        cert = info.data["tls_cert"]
        if cert is not None and value is None:
            raise ValueError("missing: server.tls_cert is set, so tls_key must name its key")
        if cert is None and value is not None:
            raise ValueError("server.tls_cert is not set: set both (wss://) or neither (ws://)")
        return value


class TokenSettings(_Section):
    """One `[[auth.tokens]]` entry (or one `[[tokens]]` entry of `auth.tokens_file`)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    sha256: str = Field(description="SHA-256 hex digest of the token; never the token itself.")
    symbols: list[str] = Field(
        default_factory=lambda: ["*"], description='Streams this token may receive; "*" = all.'
    )
    expires: datetime | None = Field(
        None,
        description=(
            "RFC 3339 date-time with a timezone (e.g. 2026-12-31T00:00:00Z) from which the token is"
            " refused; its live connections are closed (4001) then. Unset: never expires."
        ),
    )
    max_connections: int | None = Field(
        None, ge=1, description="Connections this token may hold at once (429 past it); unset: any."
    )

    @field_validator("sha256")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA256_HEX.match(value):
            raise ValueError("must be 64 hexadecimal characters (a SHA-256 digest)")
        return value

    @field_validator("expires", mode="before")
    @classmethod
    def _rfc3339_with_timezone(cls, value: Any) -> Any:
        # TOML gives an offset date-time as an aware datetime and a local one as a naive datetime;
        # the environment and JSON give strings. A bare date, a time or a number is refused.
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip()
            if not _RFC3339.match(text):
                raise ValueError(f"must be an RFC 3339 date-time, e.g. {_EXPIRES_EXAMPLE}")
            try:
                value = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
            except ValueError as exc:
                raise ValueError(f"not a valid date-time: {exc}") from None
        elif not isinstance(value, datetime):
            raise ValueError(f"must be an RFC 3339 date-time, e.g. {_EXPIRES_EXAMPLE}")
        if value.utcoffset() is None:
            raise ValueError(f"needs a timezone: end it with Z or ±hh:mm (e.g. {_EXPIRES_EXAMPLE})")
        return value

    def expired(self, now: datetime) -> bool:
        """Refused at `now` (aware): from `expires` on, that instant included."""
        return self.expires is not None and now >= self.expires

    def spec(self) -> TokenSpec:
        """This entry as the plain `auth.TokenSpec` the token store and the tokens file take."""
        return TokenSpec(
            self.name, self.sha256, tuple(self.symbols), self.expires, self.max_connections
        )


def _duplicate_problems(tokens: list[TokenSettings]) -> list[str]:
    """Two entries with one name, or one token (digest) under two names, are ambiguous: a
    revocation of one name would leave the same token valid under the other."""
    names = [t.name for t in tokens]
    problems = []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate token name(s): {', '.join(duplicates)}")
    by_digest: dict[str, list[str]] = {}
    for t in tokens:
        by_digest.setdefault(t.sha256, []).append(t.name)
    for same in by_digest.values():
        if len(same) > 1:
            problems.append(f"one token (the same sha256) under several names: {', '.join(same)}")
    return problems


class AuthSettings(_Section):
    """[auth]: bearer tokens."""

    enabled: bool = Field(True, description="false serves anyone; it must be explicit.")
    max_failures_per_minute: int = Field(
        20, ge=1, description="Failed authentications from one address before 429 answers."
    )
    tokens: list[TokenSettings] = Field(default_factory=list)
    tokens_file: Path | None = Field(
        None,
        description=(
            "TOML file of [[tokens]] entries (the keys of [[auth.tokens]]) merged with them; it"
            " must exist; keep it mode 0600. Relative: to the config file's directory."
            " `agentspoonsd token new|revoke` edit it. Re-read on SIGHUP."
        ),
    )
    # Filled by load_settings from tokens_file: not config keys, so not fields.
    _file_tokens: tuple[TokenSettings, ...] = PrivateAttr(default=())
    _tokens_file_mode: int | None = PrivateAttr(default=None)

    @field_validator("tokens")
    @classmethod
    def _unique_names(cls, tokens: list[TokenSettings]) -> list[TokenSettings]:
        problems = _duplicate_problems(tokens)
        if problems:
            raise ValueError("; ".join(problems))
        return tokens

    @property
    def file_tokens(self) -> tuple[TokenSettings, ...]:
        """The entries read from `tokens_file` (empty when it is unset or was not read)."""
        return self._file_tokens

    @property
    def all_tokens(self) -> tuple[TokenSettings, ...]:
        """Every token the daemon accepts: `[[auth.tokens]]`, then the tokens file's."""
        return (*self.tokens, *self._file_tokens)

    @property
    def tokens_file_mode(self) -> int | None:
        """The permission bits of `tokens_file` when it was read (st_mode & 0o7777)."""
        return self._tokens_file_mode


class TokensFile(_Section):
    """The whole of `auth.tokens_file`: `[[tokens]]` entries, nothing else."""

    tokens: list[TokenSettings] = Field(default_factory=list)

    @field_validator("tokens")
    @classmethod
    def _unique_names(cls, tokens: list[TokenSettings]) -> list[TokenSettings]:
        problems = _duplicate_problems(tokens)
        if problems:
            raise ValueError("; ".join(problems))
        return tokens


def parse_tokens_file(data: Mapping[str, Any]) -> list[TokenSpec]:
    """The entries of a parsed tokens file, validated as the daemon reads them (the `parse`
    argument of `tokenfile.append_token`/`remove_token`). Raises ValueError
    ``KEY: PROBLEM`` naming the first invalid key."""
    try:
        return [token.spec() for token in TokensFile(**data).tokens]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {first['msg']}") from None


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


class _ModelTable(_MarketSection):
    """A model's parameters, per year. `RETIRED` maps the per-bar keys of earlier versions to
    the key that replaces each, for the message that refuses them."""

    RETIRED: ClassVar[dict[str, str]] = {}


class GbmSettings(_ModelTable):
    """Geometric Brownian motion, in yearly units (scaled to the bar: `market.annual`)."""

    RETIRED: ClassVar[dict[str, str]] = {"mu": "annual_drift", "sigma": "annual_volatility"}

    annual_volatility: float = Field(0.65, gt=0, description=_ANNUAL_VOLATILITY)
    annual_drift: float = Field(0.0, description="Drift of the log price per year.")

    @model_validator(mode="after")
    def _valid(self) -> GbmSettings:
        _check_yearly("gbm", self)
        return self


class GarchModelSettings(_ModelTable):
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


class GjrGarchSettings(_ModelTable):
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


class HestonSettings(_ModelTable):
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
    bar_seconds: float = Field(
        None,
        ge=1e-6,
        validate_default=True,
        json_schema_extra=lambda schema: schema.pop("default", None),  # not null: interval
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


class HistorySettings(_Section):
    """[history]: updates kept per symbol, for `history` requests and `resume`."""

    size: int = Field(1000, ge=1, le=1_000_000, description="Updates kept per symbol.")
    persist: bool = Field(
        False, description="Keep the history (and so seq) in `dir` across restarts."
    )
    dir: Path = Field(Path("/var/lib/agentspoonsd"), description="Where a persisted history lives.")


class BrokerSettings(_Section):
    """[broker]: where updates flow. "memory": within this process (nothing else needed);
    "redis": several nodes share one Redis, one of them (elected) generates, every node serves
    its own clients from the Redis streams (docs/SCALING.md)."""

    kind: Literal["memory", "redis"] = Field(
        "memory", description='"memory" (one node) or "redis" (a cluster of nodes).'
    )
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        pattern=r"^(rediss?|unix)://.+",
        description="The Redis (>= 7) or Valkey of the cluster: redis://, rediss:// or unix://.",
    )
    lease: float = Field(
        2.0,
        ge=0.1,
        le=60.0,
        description="Seconds the generating node's lease lasts. It renews every third of it; "
        "when it dies another node takes over within 2 x lease.",
    )
    prefix: str = Field(
        "agentspoonsd",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.:{}-]+$",
        description="Key prefix: clusters sharing one Redis need different prefixes.",
    )


class HealthSettings(_Section):
    """[health]: HTTP /healthz, /readyz, /metrics and the dashboard; limits of that port."""

    host: str = "127.0.0.1"
    port: int = Field(8766, ge=0, le=65535)
    max_connections: int = Field(
        512,
        ge=1,
        description=(
            "HTTP connections served at once; past it a new one gets 503 (a /healthz or /readyz"
            " request on it is still answered) and is closed."
        ),
    )
    max_connections_per_ip: int = Field(
        64,
        ge=1,
        description=(
            "HTTP connections served at once from one address (IPv6: one /64); past it a new one"
            " gets 429 (a /healthz or /readyz request on it is still answered) and is closed."
            " At most max_connections, and below it so that one address leaves room for others."
        ),
    )
    request_timeout: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds a request (head and body) has to arrive, from its first byte, however slowly"
            " it trickles; a client past it is closed without an answer."
        ),
    )
    idle_timeout: float = Field(
        5.0,
        gt=0,
        description=(
            "Seconds a connection may wait for its first request, or between requests"
            " (keep-alive), before it is closed."
        ),
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description=(
            "Host names and addresses the HTTP port answers for (DNS-rebinding defence), e.g."
            ' ["localhost", "127.0.0.1", "status.example.com"]; a request naming another Host'
            " gets 421. Unset: any Host."
        ),
    )
    metrics_token_sha256: str | None = Field(
        None,
        description=(
            "SHA-256 hex digest of a token that /metrics then requires as `Authorization: Bearer"
            " <token>` (401 without it); never the token itself. Unset: /metrics is open."
        ),
    )

    @field_validator("max_connections_per_ip")
    @classmethod
    def _per_ip_within_total(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("max_connections")
        if total is not None and value > total:
            raise ValueError(f"must be at most health.max_connections ({total})")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_are_hosts(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        hosts = []
        for entry in value:
            # Ports are not compared (a Host header's port is ignored), so none is accepted here.
            host = _ipv6_literal(entry) if ":" in entry else normalise_host(entry)
            if host is None or host == "*":
                raise ValueError(f"not a host name or address (without port): {entry!r}")
            hosts.append(host)
        return hosts

    @field_validator("metrics_token_sha256")
    @classmethod
    def _is_hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if not _SHA256_HEX.match(value):
            raise ValueError("must be 64 hexadecimal characters (a SHA-256 digest)")
        return value


def _ipv6_literal(text: str) -> str | None:
    """`::1` or `[::1]` as the host `normalise_host` gives for `[::1]`; None if not IPv6."""
    return normalise_host(f"[{text.strip().strip('[]')}]")


class LogSettings(_Section):
    """[log]: structured logs on stdout."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        "auto",
        description=(
            "auto: console when stdout is a terminal, else json (journald, pipes, files); json:"
            " one JSON object per line; console: human-readable lines, coloured on a terminal"
            " unless NO_COLOR is set."
        ),
    )


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_settings`, not directly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    generator: GeneratorSettings = GeneratorSettings()
    history: HistorySettings = HistorySettings()
    broker: BrokerSettings = BrokerSettings()
    health: HealthSettings = HealthSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)


def find_config_path(
    explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> Path | None:
    """Return the config file to read, following the documented search order.

    An explicit path (``--config``) or ``$AGENTSPOONSD_CONFIG`` must exist; the default locations
    are optional, and ``None`` means "built-in defaults".
    """
    chosen = explicit if explicit is not None else environ.get(CONFIG_ENV_VAR) or None
    if chosen is not None:
        path = Path(chosen)
        try:
            mode = path.stat().st_mode  # stat, not open: a FIFO is not waited on
        except OSError:
            raise ConfigError(f"{path}: config file not found") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file ({file_kind(mode)})")
        return path
    for candidate in DEFAULT_SEARCH_PATHS:
        if candidate.is_file():
            return candidate
    return None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the config file, raising ConfigError with one line naming the file (and the line
    and column) for anything `tomlfile.parse_toml` refuses: see there for the classes of input."""
    return _read_config(path)[0]


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    """The config file's document and its text (for the positions of keys in messages): both
    from one read, so a message never points into another version of the file."""
    try:
        raw, _ = read_bounded(path, MAX_CONFIG_BYTES)
        data = parse_toml(raw)
    except FileRefused as exc:
        if exc.missing:  # found, then removed before it was read
            raise ConfigError(f"{path}: config file not found") from None
        raise ConfigError(f"{path}: {exc}") from None
    # parse_toml accepted it, so it is UTF-8; a BOM is one character before line 1's first.
    return data, raw.decode("utf-8").removeprefix("\ufeff")


def load_settings(
    path: Path | None, *, read_tokens_file: bool = True, check_tls_files: bool = True
) -> Settings:
    """Build the Settings from `path` (None: defaults only), `os.environ` and `auth.tokens_file`.

    Raises ConfigError with one line per problem, each naming the key and its source. With
    `read_tokens_file=False` the tokens file's path is resolved but the file is not read (it may
    not exist yet: `agentspoonsd token new` creates it). With `check_tls_files=False` the paths
    of `server.tls_cert`/`tls_key` are resolved but neither file is opened (a client reading the
    config to find the daemon need not be able to read its key).
    """
    data, text = _read_config(path) if path is not None else ({}, "")
    _reject_unknown_env(os.environ)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, os.environ, text)) from None
    except SettingsError as exc:
        # pydantic-settings could not decode a list-valued variable (those must be JSON).
        raise ConfigError(_describe_undecodable_env(exc, os.environ)) from None
    _check_broker(settings, path, os.environ)
    settings = _with_tls_files(settings, path, os.environ, check=check_tls_files)
    return _with_tokens_file(settings, path, os.environ, read=read_tokens_file)


def _check_broker(settings: Settings, path: Path | None, environ: Mapping[str, str]) -> None:
    """With the redis broker the stream is the history: a second, local copy on disk would
    disagree with it after another node generated."""
    if settings.broker.kind == "redis" and settings.history.persist:
        source = _key_source("history", "persist", path, environ)
        raise ConfigError(
            f'{source}: history.persist: must be false with broker.kind = "redis" '
            "(the Redis streams keep the history)"
        )


def _key_source(section: str, key: str, path: Path | None, environ: Mapping[str, str]) -> str:
    """Where the value of `section.key` came from, as _describe names it."""
    return _source((section, key), path, environ)


def _source(loc: Sequence[str | int], path: Path | None, environ: Mapping[str, str]) -> str:
    """The environment variable that set the key at `loc` (itself or a table above it, given as
    JSON), else the file, else the built-in defaults."""
    env_name = _env_name_for(loc, environ)
    if env_name is not None:
        return f"environment variable {env_name}"
    return str(path) if path is not None else "built-in defaults"


def _env_name_for(loc: Sequence[str | int], environ: Mapping[str, str]) -> str | None:
    """The set `AGENTSPOONSD_…` variable that gives the key at `loc` or the nearest table above
    it (a whole section is not a variable), in upper case."""
    names = {name.upper() for name in environ}
    keys = [str(part) for part in _leading_keys(loc)]
    for end in range(len(keys), 1, -1):
        candidate = ENV_PREFIX + "__".join(keys[:end]).upper()
        if candidate in names:
            return candidate
    return None


def _leading_keys(loc: Sequence[str | int]) -> list[str]:
    """The names of `loc` before its first list index: the part a variable name can spell."""
    keys = []
    for part in loc:
        if not isinstance(part, str):
            break
        keys.append(part)
    return keys


def _with_tls_files(
    settings: Settings, path: Path | None, environ: Mapping[str, str], *, check: bool = True
) -> Settings:
    """Resolve `server.tls_cert`/`tls_key` against the config file and (`check`) that they make a
    usable TLS context now, so a bad certificate stops the daemon at start (or a reload keeps the
    old)."""
    server = settings.server
    if server.tls_cert is None or server.tls_key is None:
        return settings
    from .tls import TlsConfigError, server_context

    files = {}
    for key in ("tls_cert", "tls_key"):
        file = getattr(server, key)
        source = _key_source("server", key, path, environ)
        if not file.is_absolute():
            from_env = source.startswith("environment")
            base = path.parent if path is not None and not from_env else Path.cwd()
            file = Path(os.path.abspath(base / file))
        files[key] = (file, source)
    try:
        if check:
            server_context(files["tls_cert"][0], files["tls_key"][0])
    except TlsConfigError as exc:
        raise ConfigError(f"{files[exc.key][1]}: server.{exc.key}: {exc.message}") from None
    resolved = server.model_copy(update={key: file for key, (file, _) in files.items()})
    return settings.model_copy(update={"server": resolved})


def _with_tokens_file(
    settings: Settings, path: Path | None, environ: Mapping[str, str], *, read: bool
) -> Settings:
    auth = settings.auth
    if auth.tokens_file is None:
        return settings
    source = _key_source("auth", "tokens_file", path, environ)
    file = auth.tokens_file
    if not file.is_absolute():
        # Relative to the file that names it, so the config and its tokens move together.
        from_env = source.startswith("environment")
        base = path.parent if path is not None and not from_env else Path.cwd()
        file = Path(os.path.abspath(base / file))
    merged = auth.model_copy(update={"tokens_file": file})
    if read:
        tokens, mode = read_tokens_file(file, named_by=f"{source}: auth.tokens_file")
        problems = []
        in_config = {t.name: i for i, t in enumerate(auth.tokens)}
        tokens_source = _key_source("auth", "tokens", path, environ)
        for j, token in enumerate(tokens):
            if token.name in in_config:
                problems.append(
                    f'{file}: tokens[{j}].name: token "{token.name}" is also defined in'
                    f" {tokens_source}: auth.tokens[{in_config[token.name]}]"
                )
        config_digests = {t.sha256: t.name for t in auth.tokens}
        for j, token in enumerate(tokens):
            other = config_digests.get(token.sha256)
            if other is not None and other != token.name:
                problems.append(
                    f'{file}: tokens[{j}].sha256: the token of "{token.name}" is also'
                    f' "{other}" in {tokens_source}: auth.tokens (one token, one name)'
                )
        if problems:
            raise ConfigError("\n".join(problems))
        merged._file_tokens = tokens
        merged._tokens_file_mode = mode
    return settings.model_copy(update={"auth": merged})


def read_tokens_file(
    file: Path, *, named_by: str = "auth.tokens_file"
) -> tuple[tuple[TokenSettings, ...], int]:
    """The entries of a tokens file and its permission bits; ConfigError names the file and key.

    A missing file is an error, not an empty list: a typo in the path must not leave the daemon
    serving only the tokens of the main config (or only an ephemeral one).
    """
    try:
        raw, mode = read_bounded(file, MAX_TOKENS_FILE_BYTES)
    except FileRefused as exc:
        if exc.missing:
            raise ConfigError(
                f"{named_by}: {file}: file not found (`agentspoonsd token new NAME` creates it)"
            ) from None
        raise ConfigError(f"{named_by}: {file}: {exc}") from None
    try:
        data = parse_toml(raw)
    except FileRefused as exc:
        raise ConfigError(f"{file}: {exc}") from None
    try:
        parsed = TokensFile(**data)
    except ValidationError as exc:
        positions = _Positions(raw.decode("utf-8").removeprefix("\ufeff"))
        lines = [
            f"{file}: {_dotted(error['loc'])}: {_problem(error, TokensFile)}"
            + positions.at(error["loc"])
            for error in exc.errors()
        ]
        raise ConfigError("\n".join(lines)) from None
    return tuple(parsed.tokens), stat.S_IMODE(mode)


def _strip_optional(annotation: Any) -> Any:
    """`X | None` as X; anything else as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _as_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _annotation_at(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> Any:
    """The type the config (or another `root` model) gives the key at `loc`, through tables,
    lists and the `generator.overrides` mapping; None when `loc` names no key."""
    current: Any = Settings if root is None else root
    for part in loc:
        model = _as_model(current)
        if model is not None:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
            continue
        current = _strip_optional(current)
        origin, args = get_origin(current), get_args(current)
        if origin is list and isinstance(part, int):
            current = args[0]
        elif origin is dict and isinstance(part, str):
            current = args[1]
        else:
            return None
    return current


def _closest(name: str, candidates: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def _suggest_key(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> str | None:
    """For an unknown key at `loc`: the real key of that table it was probably meant to be,
    else the config section that has a key of exactly that name (one put in the wrong table)."""
    name = loc[-1]
    table = _as_model(_annotation_at(loc[:-1], root))
    if not isinstance(name, str) or table is None:
        return None
    close = _closest(name, list(table.model_fields))
    if close is not None:
        return close
    if root is not None:
        return None
    elsewhere = [
        f"{section}.{name}"
        for section, field in Settings.model_fields.items()
        if name in field.annotation.model_fields  # type: ignore[union-attr]
    ]
    return elsewhere[0] if len(elsewhere) == 1 else None


_RETIRED_NOTE = "model parameters are given per year now and scaled to bar_seconds"


def _retired_key(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> str | None:
    """For a per-bar model key of earlier versions (`generator.gbm.sigma`): the yearly key that
    replaces it; else None."""
    name = loc[-1]
    table = _as_model(_annotation_at(loc[:-1], root))
    if not isinstance(name, str) or table is None or not issubclass(table, _ModelTable):
        return None
    return table.RETIRED.get(name)


def _reject_unknown_env(environ: Mapping[str, str]) -> None:
    """An `AGENTSPOONSD_X__Y[__Z…]` variable that names no key is a typo the operator wants to
    hear of, with the variable that was probably meant."""
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NOT_SETTINGS:
            continue
        problem = _env_key_problem(upper[len(ENV_PREFIX) :].lower().split("__"))
        if problem is not None:
            raise ConfigError(f"environment variable {name}: {problem}")


def _env_key_problem(parts: list[str]) -> str | None:
    """None when `parts` (a variable's name split at `__`) name a key, else why not, with the
    variable that does name one when a part is a near miss."""
    sections = list(Settings.model_fields)
    if parts[0] not in sections:
        problem = f"no config section '{parts[0]}'"
        close = _closest(parts[0], sections)
        fixed = [close, *parts[1:]] if close else None
    elif len(parts) < 2 or _annotation_at(parts) is None:
        problem = f"no key '{'.'.join(parts)}'"
        fixed = None
        for depth in range(1, len(parts)):
            table = _as_model(_annotation_at(parts[:depth]))
            if table is None:
                break
            if parts[depth] not in table.model_fields:
                retired = _retired_key(parts[: depth + 1])
                if retired is not None:
                    problem += f" ({_RETIRED_NOTE})"
                close = retired or _closest(parts[depth], list(table.model_fields))
                if close is not None:
                    fixed = [*parts[:depth], close, *parts[depth + 1 :]]
                break
        if fixed is not None and _annotation_at(fixed) is None:
            fixed = None
    else:
        return None
    if fixed is None:
        return problem
    return f"{problem}; did you mean {ENV_PREFIX}{'__'.join(fixed).upper()}?"


def _describe_undecodable_env(exc: SettingsError, environ: Mapping[str, str]) -> str:
    lines = []
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NOT_SETTINGS:
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split("__")
        annotation = _strip_optional(_annotation_at(parts))  # a key: _reject_unknown_env ran
        if get_origin(annotation) in (list, dict):
            kind = "list"
        elif _as_model(annotation) is not None:
            kind = "object (a table)"
        else:
            continue  # pydantic-settings decodes only lists, tables and mappings as JSON
        try:
            json.loads(value)
        except ValueError:
            lines.append(f"environment variable {upper}: {'.'.join(parts)}: must be a JSON {kind}")
    return "\n".join(lines) or f"environment: {exc}"


# The values of keys named like these are never repeated in a message: a token pasted where its
# digest belongs, or a broker URL with its password, must not reach a terminal log or a journal.
_SECRET_KEY_HINTS = ("sha256", "token", "url", "password", "secret")
_MAX_SHOWN_VALUE = 80


def _shown_value(loc: Sequence[str | int], value: Any) -> str | None:
    """The offending value as TOML would write it, for the message; None when it is not shown
    (a key that may hold a secret, a whole table, or too long a value)."""
    last = next((part for part in reversed(loc) if isinstance(part, str)), "")
    if any(hint in last for hint in _SECRET_KEY_HINTS):
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float | str):
        text = json.dumps(value) if isinstance(value, str) else repr(value)
    elif isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, list) and all(isinstance(v, int | float | str) for v in value):
        text = json.dumps(value, ensure_ascii=False)
    else:
        return None
    return text if len(text) <= _MAX_SHOWN_VALUE else None


def _describe(
    exc: ValidationError, path: Path | None, environ: Mapping[str, str], text: str = ""
) -> str:
    """One line per problem: `SOURCE: KEY: PROBLEM[, got VALUE][; did you mean `KEY`?]`, and
    `(at line L, column C)` when the key is in the file `text` was read from."""
    positions = _Positions(text)
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        source = _source(loc, path, environ)
        message = _problem(error)
        if path is not None and not source.startswith("environment"):
            message += positions.at(loc)
        lines.append(f"{source}: {_dotted(loc)}: {message}")
    return "\n".join(lines)


def _problem(error: Any, root: type[BaseModel] | None = None) -> str:
    """What is wrong with one key (a pydantic error of a `root` model, default Settings): the
    rule it breaks and the value, or for an unknown key the real key it was probably meant to
    be."""
    loc = error["loc"]
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown key"
        retired = _retired_key(loc, root)
        suggestion = _suggest_key(loc, root) if retired is None else None
        if retired is not None:
            message += f"; {_RETIRED_NOTE}: use `{retired}`"
        elif suggestion is not None:
            message += f"; did you mean `{suggestion}`?"
    elif error["type"] != "missing":
        shown = _shown_value(loc, error["input"])
        if shown is not None:
            message += f", got {shown}"
    return message


class _Positions:
    """Where keys are in one file's text, scanned at the first question (only a config with an
    error pays for the scan)."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._positions: dict[Any, tuple[int, int]] | None = None

    def at(self, loc: Sequence[str | int]) -> str:
        """` (at line L, column C)` for the key at `loc` (or its nearest table), else ``."""
        if self._positions is None:
            self._positions = key_positions(self._text)
        found = locate(self._positions, loc)
        return f" (at line {found[0]}, column {found[1]})" if found is not None else ""


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _dotted(loc: tuple[int | str, ...]) -> str:
    """A key path as the config writes it: `auth.tokens[0].name`, `overrides."ETH/USD".model`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.match(part) else json.dumps(part, ensure_ascii=False)
            out += ("." if out else "") + key
    return out


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective config as plain data, with token digests shortened (safe to print).

    `auth.tokens` lists the tokens file's entries too, each token with its `source`.
    """
    data = settings.model_dump(mode="json")
    auth = settings.auth
    data["auth"]["tokens"] = [
        {**token.model_dump(mode="json"), "source": source}
        for tokens, source in ((auth.tokens, "config"), (auth.file_tokens, "tokens_file"))
        for token in tokens
    ]
    for token in data["auth"]["tokens"]:
        token["sha256"] = token["sha256"][:8] + "…(redacted)"
    metrics_digest = data["health"].get("metrics_token_sha256")
    if metrics_digest:
        data["health"]["metrics_token_sha256"] = metrics_digest[:8] + "…(redacted)"
    return data
