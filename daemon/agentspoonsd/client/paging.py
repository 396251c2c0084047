"""History requests that follow the daemon's pages, and merging several symbols' histories."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

Request = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


async def history_pages(request: Request, symbol: str, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` updates of `symbol`, oldest first, following the daemon's pages (a
    reply holds at most 256 KiB: `more` and `before_seq` lead to the older ones). `request`
    sends one request and returns its reply."""
    message: dict[str, Any] = {"type": "history", "symbol": symbol, "limit": limit}
    pages: list[list[dict[str, Any]]] = []
    wanted = limit
    while wanted > 0:
        reply = await request(message)
        updates = list(reply.get("updates") or [])
        pages.append(updates)
        wanted -= len(updates)
        if not reply.get("more") or not updates or "before_seq" not in reply:
            break  # a daemon without pages, or nothing older retained
        message = {**message, "limit": wanted, "before_seq": reply["before_seq"]}
    return [row for page in reversed(pages) for row in page]


def merge_newest(rows: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The newest `limit` of several symbols' rows, ordered by bar time, then symbol. Pure."""
    ordered = sorted(rows, key=lambda d: (str(d.get("timestamp")), str(d.get("symbol"))))
    return ordered[-limit:] if limit > 0 else []
