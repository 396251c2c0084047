"""The config's tables other than `[generator]`, and `Settings`, the whole of it.

The models are the documentation of the config: each field carries its default, its constraint
and a description (`make schema` writes config/agentspoonsd.schema.json from them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ..auth import TokenSpec
from ..configpaths import ENV_PREFIX
from ..httppolicy import PublicUrl, normalise_host
from ..proxies import parse_network
from .base import SHA256_HEX as _SHA256_HEX
from .base import Section as _Section
from .generator import GeneratorSettings

# RFC 3339 §5.6 date-time; the offset is optional here only to say precisely that it is missing.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$")
_EXPIRES_EXAMPLE = "2026-12-31T00:00:00Z"


class ServerSettings(_Section):
    """[server]: the WebSocket listener."""

    host: str = Field("0.0.0.0", description="Address the WebSocket listener binds.")
    port: int = Field(8765, ge=0, le=65535, description="WebSocket port (0 picks a free one).")
    max_connections: int = Field(
        20000,
        ge=1,
        description=(
            "Connections served at once; upgrades past it get HTTP 503. At most what the"
            " descriptor limit (LimitNOFILE) holds: one descriptor per client, less 64 and"
            " [health] max_connections for a single process; the lower value is used and"
            " logged as max_connections_capped."
        ),
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
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description=(
            "Fan-out worker processes sharing the port: 1 is one process; N > 1 runs a master"
            " (generator, history, HTTP) and N workers serving the clients, each update encoded"
            ' once; "auto": one per usable core. max_connections, max_connections_per_ip and'
            " each token's max_connections are split evenly across the workers. Needs a restart."
        ),
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _whole_number_or_auto(cls, value: Any) -> Any:
        # One message for every wrong value (the union would give one per branch, in pydantic's
        # own words); `workers = true` is a mistake, not 1.
        if isinstance(value, str) and value.isdigit():  # from the environment: text
            value = int(value)
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError('must be a whole number >= 1 or "auto"')

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
