"""`UpdateBuffer`: the consumer's side of the stream. Pure: no I/O, no event loop."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .errors import StreamReset
from .tracker import Update


@dataclass(frozen=True, slots=True)
class ResetItem:
    """A `StreamReset` in its place in the stream, raised when the consumer reaches it."""

    error: StreamReset


class UpdateBuffer:
    """Updates (and resets) received and not yet returned, in stream order, and the local
    history: the newest `keep_recent` updates received, the latest one per symbol.

    Guarantees: `pop` returns items in the order they were pushed, each once; the local
    history reflects every update *received* (ahead of what `pop` has returned).
    """

    def __init__(self, keep_recent: int = 1000) -> None:
        self._items: deque[Update | ResetItem] = deque()
        self._recent: deque[Update] = deque(maxlen=keep_recent)
        self._latest: dict[str, Update] = {}
        self._latest_any: Update | None = None

    def __len__(self) -> int:
        """Items waiting (updates and resets): what the backpressure limit counts."""
        return len(self._items)

    def push_update(self, update: Update) -> None:
        self._items.append(update)
        self._latest[update.symbol] = update
        self._latest_any = update
        self._recent.append(update)

    def push_reset(self, error: StreamReset) -> None:
        self._items.append(ResetItem(error))

    def pop(self) -> Update | ResetItem | None:
        """The oldest item waiting, removed; None when there is none."""
        return self._items.popleft() if self._items else None

    @property
    def buffered(self) -> int:
        """Updates waiting (resets not counted)."""
        return sum(1 for item in self._items if isinstance(item, Update))

    def latest(self, symbol: str | None = None) -> Update | None:
        """The newest update received (of `symbol`, if given)."""
        return self._latest_any if symbol is None else self._latest.get(symbol)

    def recent(self, limit: int | None = None, symbol: str | None = None) -> list[Update]:
        """The last `limit` updates received (of `symbol`, if given), oldest first."""
        kept = [u for u in self._recent if symbol is None or u.symbol == symbol]
        return kept if limit is None else kept[-limit:] if limit > 0 else []
