"""Bearer-token authentication: pure functions, no sockets.

Tokens are kept only as SHA-256 digests. A presented token is hashed and compared with every
configured digest in constant time, so neither a match nor its position leaks through timing.
A token past its `expires` is refused like an unknown one (the 401 says invalid_token), with its
own failure label so logs and metrics tell them apart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from urllib.parse import parse_qsl

TOKEN_BYTES = 32


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """One accepted token, as the config gives it (`settings.TokenSettings.spec()` builds it from
    an `[[auth.tokens]]` or tokens-file entry, validated there): never the token itself."""

    name: str
    sha256: str  # lower-case hex digest of the token
    symbols: tuple[str, ...] = ("*",)  # streams it may receive; "*" = all
    expires: datetime | None = None  # aware; refused from this instant on
    max_connections: int | None = None  # connections it may hold at once; None: any


class AuthFailure(Enum):
    """Why an upgrade was refused; the value is the metrics/log label."""

    MISSING = "missing_token"
    INVALID = "invalid_token"
    EXPIRED = "expired"  # a configured token past its `expires`; answered as invalid_token


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authenticated connection may do."""

    name: str
    symbols: frozenset[str]  # may contain "*"
    max_connections: int | None = None  # connections this token may hold at once; None: any
    expires: datetime | None = None  # aware; refused from this instant on

    def allows(self, symbol: str) -> bool:
        return "*" in self.symbols or symbol in self.symbols


ANONYMOUS = Grant(name="anonymous", symbols=frozenset({"*"}))


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe) that does not start with "-": one that did
    would read as an option on a command line (`watch --token -x…` fails in argparse)."""
    while True:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        if not token.startswith("-"):
            return token


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored in the config for `token`."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The configured tokens, by digest. Immutable: a reload builds a new store."""

    def __init__(
        self,
        tokens: Iterable[TokenSpec],
        *,
        enabled: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.enabled = enabled
        self._clock = clock
        self._entries = tuple(
            (
                bytes.fromhex(t.sha256),
                Grant(t.name, frozenset(t.symbols), t.max_connections, t.expires),
            )
            for t in tokens
        )
        self._by_name = {grant.name: (digest, grant) for digest, grant in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(
        self, token: str | None, *, now: datetime | None = None
    ) -> Grant | AuthFailure:
        """Return the token's grant, or why it is refused. With auth disabled, everyone passes."""
        if not self.enabled:
            return ANONYMOUS
        if not token:
            return AuthFailure.MISSING
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Grant | None = None
        for expected, grant in self._entries:
            # No early exit: every digest is compared, whatever matches.
            if hmac.compare_digest(digest, expected):
                found = grant
        if found is None:
            return AuthFailure.INVALID
        if found.expires is not None and (now or self._clock()) >= found.expires:
            return AuthFailure.EXPIRED
        return found

    def grant(self, name: str) -> Grant | None:
        """The grant of the token called `name`, expired or not."""
        entry = self._by_name.get(name)
        return entry[1] if entry else None

    def specs(self) -> list[TokenSpec]:
        """The tokens as configured (digests, never the tokens themselves), in order: what a
        worker process builds the same store from (`workerconfig`)."""
        return [
            TokenSpec(g.name, digest.hex(), tuple(sorted(g.symbols)), g.expires, g.max_connections)
            for digest, g in self._entries
        ]

    def expired(self, now: datetime) -> dict[str, datetime]:
        """The tokens refused at `now` because of their `expires`, with that instant."""
        return {
            grant.name: grant.expires
            for _, grant in self._entries
            if grant.expires is not None and now >= grant.expires
        }

    def revoked_since(self, old: TokenStore, now: datetime) -> dict[str, str]:
        """The tokens of `old` whose connections this store no longer allows, with why.

        `removed`: the name is gone; `replaced`: the name now has another token (digest);
        `expired`: the name is past its `expires` at `now`. Switching auth on revokes the
        anonymous connections the old store let in (`auth_enabled`); switching it off revokes
        nothing, since every client is now welcome.
        """
        if not self.enabled:
            return {}
        if not old.enabled:
            return {ANONYMOUS.name: "auth_enabled"}
        revoked = {}
        for name, (digest, _) in old._by_name.items():
            entry = self._by_name.get(name)
            if entry is None:
                revoked[name] = "removed"
            elif not hmac.compare_digest(entry[0], digest):
                revoked[name] = "replaced"
            elif entry[1].expires is not None and now >= entry[1].expires:
                revoked[name] = "expired"
        return revoked


def presented_token(target: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The bearer token of an upgrade request: the Authorization header, else ?access_token=.

    RFC 6750 §2.1 (header) takes precedence over §2.3 (query parameter), which exists for
    browsers that cannot set headers on a WebSocket upgrade.
    """
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
            return None
    # Not urlsplit: it raises on some targets (e.g. "//[x"), and only the query matters here.
    for key, query_value in parse_qsl(target.partition("?")[2].partition("#")[0]):
        if key == "access_token":
            return query_value
    return None
