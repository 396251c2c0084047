"""The daemon's configuration: pydantic models for every section, and how they are loaded.

The models are the documentation of the config: each field carries its default, its constraint and a
description. `load_settings` is the one place that reads a TOML file, applies
`AGENTSPOONSD_<SECTION>__<KEY>` environment overrides and turns every failure into a `ConfigError`
whose message names the key and where its value came from.

Precedence, highest first: environment variables, the TOML file, the built-in defaults.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

EXIT_CONFIG = 78  # sysexits EX_CONFIG: the daemon refuses to start on a bad configuration
ENV_PREFIX = "AGENTSPOONSD_"
CONFIG_ENV_VAR = "AGENTSPOONSD_CONFIG"
DEFAULT_SEARCH_PATHS = (
    Path("agentspoonsd.toml"),
    Path("/etc/agentspoonsd/agentspoonsd.toml"),
)

# Keys of the public contract whose feature is not built yet: refused rather than silently ignored.
_NOT_YET = "{} is not available in this version of agentspoonsd; remove the key"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(Exception):
    """The configuration cannot be used. The message is meant for the operator, as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `port = true` as 1; in a config file that is a mistake.
        annotation = cls.model_fields[info.field_name].annotation  # type: ignore[index]
        if isinstance(value, bool) and annotation in (int, float, int | None):
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
    max_message_size: int = Field(
        64 * 1024, ge=256, description="Largest client message accepted, in bytes."
    )
    listen_backlog: int = Field(
        16384,
        ge=1,
        description="Accept queue of the listening socket; Linux caps it at net.core.somaxconn.",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate; with tls_key serves wss://.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _tls_not_yet(cls, value: Path | None) -> Path | None:
        if value is not None:
            raise ValueError(_NOT_YET.format("wss:// (TLS)"))
        return value


class TokenSettings(_Section):
    """One `[[auth.tokens]]` entry."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    sha256: str = Field(description="SHA-256 hex digest of the token; never the token itself.")
    symbols: list[str] = Field(
        default_factory=lambda: ["*"], description='Streams this token may receive; "*" = all.'
    )

    @field_validator("sha256")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA256_HEX.match(value):
            raise ValueError("must be 64 hexadecimal characters (a SHA-256 digest)")
        return value


class AuthSettings(_Section):
    """[auth]: bearer tokens."""

    enabled: bool = Field(True, description="false serves anyone; it must be explicit.")
    tokens: list[TokenSettings] = Field(default_factory=list)

    @field_validator("tokens")
    @classmethod
    def _unique_names(cls, tokens: list[TokenSettings]) -> list[TokenSettings]:
        names = [t.name for t in tokens]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate token name(s): {', '.join(duplicates)}")
        return tokens


class GeneratorSettings(_Section):
    """[generator]: the simulated market."""

    interval: float = Field(2.0, gt=0, le=3600, description="Seconds between updates of a symbol.")
    symbols: list[Annotated[str, Field(min_length=1, max_length=32)]] = Field(
        default_factory=lambda: ["BTC/USD"], min_length=1
    )
    model: Literal["garch"] = Field("garch", description="Simulation model.")
    seed: int | None = Field(None, description="Fixed seed: the same stream on every start.")
    volatility_window: int = Field(
        20, ge=2, le=10000, description="Bars in the rolling standard deviation `volatility`."
    )
    initial_price: float = Field(50000.0, gt=0, description="Starting price of every symbol.")

    @field_validator("symbols")
    @classmethod
    def _unique_symbols(cls, symbols: list[str]) -> list[str]:
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be unique")
        if "*" in symbols:
            raise ValueError('"*" is not a symbol name')
        return symbols


class HistorySettings(_Section):
    """[history]: updates kept per symbol."""

    size: int = Field(1000, ge=1, le=1_000_000)
    persist: bool = False

    @field_validator("persist")
    @classmethod
    def _persist_not_yet(cls, value: bool) -> bool:
        if value:
            raise ValueError(_NOT_YET.format("a persistent history"))
        return value

    dir: Path = Path("/var/lib/agentspoonsd")


class BrokerSettings(_Section):
    """[broker]: where updates flow between nodes."""

    kind: Literal["memory", "redis"] = "memory"

    @field_validator("kind")
    @classmethod
    def _redis_not_yet(cls, value: str) -> str:
        if value == "redis":
            raise ValueError(_NOT_YET.format("the redis broker"))
        return value

    url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^rediss?://")


class HealthSettings(_Section):
    """[health]: HTTP /healthz, /readyz and /metrics."""

    host: str = "127.0.0.1"
    port: int = Field(8766, ge=0, le=65535)


class LogSettings(_Section):
    """[log]: structured logs on stdout."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


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
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    for candidate in DEFAULT_SEARCH_PATHS:
        if candidate.is_file():
            return candidate
    return None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file, raising ConfigError with the file and position on failure."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load_settings(path: Path | None) -> Settings:
    """Build the Settings from `path` (None: defaults only) and `os.environ`.

    Raises ConfigError with one line per problem, each naming the key and its source.
    """
    data = read_toml(path) if path is not None else {}
    _reject_unknown_env(os.environ)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, os.environ)) from None
    except SettingsError as exc:
        # pydantic-settings could not decode a list-valued variable (those must be JSON).
        raise ConfigError(_describe_undecodable_env(exc, os.environ)) from None


def _reject_unknown_env(environ: Mapping[str, str]) -> None:
    """An `AGENTSPOONSD_X__Y` variable that names no key is a typo the operator wants to hear of."""
    sections = Settings.model_fields
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV_VAR:
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split("__")
        section = sections.get(parts[0])
        if section is None:
            raise ConfigError(f"environment variable {name}: no config section '{parts[0]}'")
        if len(parts) != 2 or parts[1] not in section.annotation.model_fields:  # type: ignore[union-attr]
            raise ConfigError(f"environment variable {name}: no key '{'.'.join(parts)}'")


def _describe_undecodable_env(exc: SettingsError, environ: Mapping[str, str]) -> str:
    lines = []
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV_VAR:
            continue
        section, _, key = upper[len(ENV_PREFIX) :].lower().partition("__")
        model = Settings.model_fields[section].annotation  # known: _reject_unknown_env ran
        field = model.model_fields[key]  # type: ignore[union-attr]
        if get_origin(field.annotation) is not list:
            continue
        try:
            json.loads(value)
        except ValueError:
            lines.append(f"environment variable {upper}: {section}.{key}: must be a JSON list")
    return "\n".join(lines) or f"environment: {exc}"


def _describe(exc: ValidationError, path: Path | None, environ: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        key = _dotted(error["loc"])
        env_name = ENV_PREFIX + "__".join(str(p) for p in error["loc"][:2]).upper()
        if env_name in {k.upper() for k in environ}:
            source = f"environment variable {env_name}"
        elif path is not None:
            source = str(path)
        else:
            source = "built-in defaults"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective config as plain data, with token digests shortened (safe to print)."""
    data = settings.model_dump(mode="json")
    for token in data["auth"]["tokens"]:
        token["sha256"] = token["sha256"][:8] + "…(redacted)"
    return data
