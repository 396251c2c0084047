"""The daemon's tokens: the auth store built from the settings, and the closing of the live
connections of a token revoked or past its `expires`.

`TokenKeeper` remembers what outlives one store: the ephemeral token (made once, kept across
reloads) and which expiries were already acted on (each closes its connections once).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import trio
from structlog.typing import FilteringBoundLogger

from .auth import TokenSpec, TokenStore, hash_token, new_token
from .closecodes import CLOSE_TOKEN_REVOKED
from .settings import Settings
from .workerpool import WorkerPool
from .ws import WebSocketServer

# What serves the clients: this process's WebSocketServer, or (workers > 1) the pool of worker
# processes, which offers the daemon the same surface.
Serving = WebSocketServer | WorkerPool
TOKEN_EXPIRY_CHECK_INTERVAL = 1.0  # seconds: how late past `expires` a connection may live


def due_expiries(
    expired: Mapping[str, datetime], handled: set[tuple[str, datetime]]
) -> dict[str, datetime]:
    """The expired tokens not yet acted on: a (name, expires) pair is due once, and a token
    given a new `expires` (by a reload) that passes too is due again."""
    return {name: at for name, at in expired.items() if (name, at) not in handled}


class TokenKeeper:
    """Builds the auth store from settings and closes the connections of expired tokens."""

    def __init__(self, log: FilteringBoundLogger) -> None:
        self._log = log
        self._ephemeral: TokenSpec | None = None
        # In plain text, for the start banner only; None when tokens are configured.
        self.ephemeral_token: str | None = None
        # (name, expires) of the tokens whose expiry was already acted on.
        self._expiries_handled: set[tuple[str, datetime]] = set()

    def store(self, settings: Settings) -> TokenStore:
        """The auth store for `settings`, with the ephemeral token when none is configured (and
        no tokens file: an empty one refuses everyone).

        Warns about a tokens file others may read, and about configured tokens already expired
        (their connections, if any, are closed by the reload; `expire_loop` skips them).
        """
        auth = settings.auth
        tokens = [token.spec() for token in auth.all_tokens]
        if auth.enabled and not tokens and auth.tokens_file is not None:
            # Tokens are managed in a file: its last one revoked means no one, not a new token.
            self._log.warning("auth_no_tokens", tokens_file=str(auth.tokens_file))
        elif auth.enabled and not tokens:
            if self._ephemeral is None:
                token = new_token()
                self._ephemeral = TokenSpec(name="ephemeral", sha256=hash_token(token))
                # The one deliberate exception to "no secret in a log": without it a fresh
                # daemon could not be used. Shown once, by the start banner (daemon_started).
                self.ephemeral_token = token
                self._log.warning(
                    "auth_ephemeral_token",
                    token="ephemeral",
                    hint="valid until the daemon stops; daemon_started shows it in dashboard_url"
                    " and watch; for a lasting token: agentspoonsd token new NAME",
                )
            tokens = [self._ephemeral]
        mode = auth.tokens_file_mode
        if auth.tokens_file is not None and mode is not None and mode & 0o077:
            self._log.warning(
                "tokens_file_permissions",
                path=str(auth.tokens_file),
                mode=f"{mode:04o}",
                hint=f"group or others have access: chmod 600 {auth.tokens_file}",
            )
        store = TokenStore(tokens, enabled=auth.enabled)
        expired = store.expired(datetime.now(UTC))
        if expired and auth.enabled:
            self._log.warning("tokens_expired", names=sorted(expired))
        self._expiries_handled.update(expired.items())
        return store

    def close_connections(
        self, websocket: Serving, causes: dict[str, str], event: str, reason: str
    ) -> None:
        """Close the live connections of each token in `causes` (4001) and log `event` per name,
        with how many it had: one pass over the connections, however many names."""
        closed = websocket.close_token_connections(
            set(causes), code=CLOSE_TOKEN_REVOKED, reason=reason
        )
        for name in sorted(causes):
            # With workers, each counts (and logs) its own: token_connections_closed.
            count = None if closed is None else closed.get(name, 0)
            self._log.info(event, name=name, cause=causes[name], connections=count)

    async def expire_loop(self, websocket: Serving) -> None:
        """Close a token's live connections once it expires (within the check interval), until
        cancelled; never raises but trio.Cancelled.

        An expired token is refused at the upgrade by the store; this task is for connections
        opened before. One pass a second over the few tokens costs nothing.
        """
        while True:
            await trio.sleep(TOKEN_EXPIRY_CHECK_INTERVAL)
            try:
                due = due_expiries(
                    websocket.auth.expired(datetime.now(UTC)), self._expiries_handled
                )
                if websocket.auth.enabled and due:
                    self._expiries_handled.update(due.items())
                    causes = dict.fromkeys(due, "expired")
                    self.close_connections(websocket, causes, "token_expired", "token expired")
            except Exception as exc:  # an unsupervised task: never take the daemon down
                self._log.error("token_expiry_check_failed", error=repr(exc))
