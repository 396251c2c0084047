"""Bearer-token authentication: pure functions, no sockets.

Tokens are kept only as SHA-256 digests. A presented token is hashed and compared with every
configured digest in constant time, so neither a match nor its position leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qsl, urlsplit

from .settings import TokenSettings

TOKEN_BYTES = 32


class AuthFailure(Enum):
    """Why an upgrade was refused; the value is the metrics/log label."""

    MISSING = "missing_token"
    INVALID = "invalid_token"


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authenticated connection may do."""

    name: str
    symbols: frozenset[str]  # may contain "*"

    def allows(self, symbol: str) -> bool:
        return "*" in self.symbols or symbol in self.symbols


ANONYMOUS = Grant(name="anonymous", symbols=frozenset({"*"}))


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored in the config for `token`."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The configured tokens, by digest. Immutable: a reload builds a new store."""

    def __init__(self, tokens: Iterable[TokenSettings], *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._entries = tuple(
            (bytes.fromhex(t.sha256), Grant(t.name, frozenset(t.symbols))) for t in tokens
        )

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str | None) -> Grant | AuthFailure:
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
        return found if found is not None else AuthFailure.INVALID


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
    for key, value in parse_qsl(urlsplit(target).query):
        if key == "access_token":
            return value
    return None
