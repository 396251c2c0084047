"""The leader's Redis I/O: where the streams stand when a term begins, and appending batches
while the lease is ours (`publication.Publication` decides the seqs and reads the replies)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import coredis
import trio
from structlog.typing import FilteringBoundLogger

from .. import protocol
from ..backoff import Backoff
from ..market.bar import Bar
from .availability import BACKOFF_INITIAL, BACKOFF_MAX, UNAVAILABLE, Link
from .entries import BadEntry, decode_entry, seq_of
from .publication import Outcome, Publication, Resync

Script = Callable[..., Awaitable[Any]]  # a registered Lua script: (keys=..., args=...) → reply


async def read_tops(
    client: coredis.Redis[bytes], keys: Mapping[str, str], count: int, per_stream_s: float
) -> tuple[dict[str, int | None], dict[str, list[dict[str, Any]]]]:
    """Each stream's top seq (None: empty), and the `data` of its newest `count` updates, oldest
    first: enough bars to carry on the estimator windows and the GARCH fit. Only an unbroken
    run of our own updates up to the top counts."""
    tops: dict[str, int | None] = {}
    recent: dict[str, list[dict[str, Any]]] = {}
    for symbol, key in keys.items():
        with trio.fail_after(per_stream_s):
            entries = await client.xrevrange(key, "+", "-", count=count)
        tops[symbol] = seq_of(entries[0].identifier) if entries else None
        updates = []
        for entry in reversed(entries):
            try:
                updates.append(decode_entry(symbol, entry.identifier, entry.field_values))
            except BadEntry:
                updates.clear()
        recent[symbol] = [u.message["data"] for u in updates]
    return tops, recent


class Publisher:
    """Appends batches of bars to the streams, atomically, fenced by the lease (the publish
    script appends nothing unless the lease is `node_id`'s and every seq continues its stream).
    """

    def __init__(
        self,
        script: Script,
        *,
        lease_key: str,
        keys: Mapping[str, str],
        node_id: str,
        maxlen: int,
        timeout: float,
        link: Link,
        log: FilteringBoundLogger,
    ) -> None:
        self._script = script
        self._lease_key = lease_key
        self._keys = keys
        self._node_id = node_id
        self._maxlen = maxlen
        self._timeout = timeout
        self._link = link
        self._log = log

    async def publish(self, batch: Sequence[Bar], next_seqs: dict[str, int]) -> bool:
        """Append one batch (several bars of a symbol in series order when the generator
        catches up) and advance `next_seqs` past it. False: deposed (nothing appended).

        Retries Redis failures with backoff until it succeeds (cancel it to stop: the term's
        end); a batch that reached Redis although its reply was lost is recognised, not
        published twice; a stream top elsewhere than expected is logged (``broker_seq_resync``)
        and the batch renumbered."""
        published = datetime.now(UTC)
        publication = Publication([bar.symbol for bar in batch], next_seqs)
        keys = [self._lease_key, *(self._keys[bar.symbol] for bar in batch)]
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        while True:
            args: list[str | bytes | int] = [self._node_id, self._maxlen]
            for bar, seq in zip(batch, publication.seqs, strict=True):
                args += [seq, protocol.encode(protocol.update_message(bar, seq, published))]
            try:
                with trio.fail_after(self._timeout):
                    reply = await self._script(keys=keys, args=args)
            except UNAVAILABLE as exc:
                self._link.down(exc)
                publication.failed()
                await trio.sleep(backoff.next())
                continue
            verdict = publication.judge(reply)
            if verdict is Outcome.DEPOSED:
                return False
            if verdict is Outcome.PUBLISHED:
                next_seqs.update(publication.following)
                return True
            assert isinstance(verdict, Resync)
            self._log.warning(
                "broker_seq_resync",
                symbol=verdict.symbol,
                expected_seq=verdict.expected_seq,
                stream_top=verdict.stream_top,
            )
