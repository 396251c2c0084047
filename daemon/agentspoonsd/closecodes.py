"""The WebSocket close codes the server sends (RFC 6455 §7.4.1; docs/PROTOCOL.md lists them)."""

from __future__ import annotations

CLOSE_GOING_AWAY = 1001  # shutdown, idle timeout
CLOSE_POLICY = 1008  # a flood, too many errors
CLOSE_TOO_BIG = 1009  # a message over max_message_size
CLOSE_TRY_AGAIN_LATER = 1013  # the unread backlog passed max_backlog_bytes
CLOSE_TOKEN_REVOKED = 4001  # the token was revoked, replaced or expired (docs/PROTOCOL.md)
