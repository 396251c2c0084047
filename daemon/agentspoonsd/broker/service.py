"""The redis broker service: one node of a cluster that shares one Redis.

Task tree (under the supervisor's ``broker`` service)::

    RedisBroker.run          the coredis client (anyio, here on Trio)
    ├── _mirror_loop         stream entries → the local hub (history, resume, broadcast)
    └── _election_loop       the lease: take it, renew it, lose it
        └── _lead            while the lease is ours: the generator and the publisher

Every node, the generating one included, broadcasts only what it reads back from the streams:
all nodes send the same bytes, and a client can resume on any node. Redis being unreachable
is a state, not a crash: both loops log the change once, back off and retry; the readiness
probe reports `problem`; connected clients stay connected and get the updates again when
Redis returns.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from .. import protocol
from ..backoff import Backoff
from ..hub import Hub
from ..market.bar import Bar
from ..market.generator import Generator
from ..settings import Settings
from .election import (
    ACQUIRE_SCRIPT,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
    Election,
    Role,
    Transition,
)
from .entries import (
    PUBLISH_SCRIPT,
    BadEntry,
    Continuity,
    continuity,
    decode_entry,
    lease_key,
    next_seq_after,
    redact_url,
    seq_of,
    stream_key,
)

# What "Redis is unreachable or unusable right now" looks like: retried, never a crash.
UNAVAILABLE = (RedisError, OSError, trio.TooSlowError)

XREAD_BLOCK = 1.0  # seconds a blocking XREAD waits for new entries before asking again
XREAD_COUNT = 1000  # entries per stream per XREAD (catching up after an outage)
BACKOFF_INITIAL = 0.05  # seconds before the first retry after a failure, doubling...
BACKOFF_MAX = 1.0  # ...up to this
LINK_GRACE = 0.25  # seconds after a success during which a failure is not yet an outage


class Link:
    """Whether this node can talk to Redis, as the loops last found out. Logs each change once.

    Both loops report every outcome; a failure more than `LINK_GRACE` after the last success
    logs `broker_disconnected`, the first success after it `broker_connected`. (Right after
    Redis comes back, a command may still fail on a connection of the old server while another
    succeeds: that is not a new outage, and must not log one.)
    """

    def __init__(self, log: FilteringBoundLogger, url: str) -> None:
        self._log = log
        self._url = redact_url(url)
        self.connected: bool | None = None  # None: not tried yet
        self.error: str | None = None
        self._down_since: float | None = None
        self._last_ok = float("-inf")
        self.outages = 0  # broker_disconnected events so far

    def up(self) -> None:
        self._last_ok = trio.current_time()
        if self.connected:
            return
        fields: dict[str, Any] = {"url": self._url}
        if self._down_since is not None:
            fields["down_s"] = round(trio.current_time() - self._down_since, 3)
        self.connected, self.error, self._down_since = True, None, None
        self._log.info("broker_connected", **fields)

    def down(self, exc: BaseException) -> None:
        error = _describe(exc)
        if self.connected is False:
            self.error = error  # the newest reason for /readyz, without a new log line
            return
        if self.connected and trio.current_time() - self._last_ok < LINK_GRACE:
            return  # one stale pooled connection right after a success: not an outage yet
        self.connected, self.error = False, error
        self.outages += 1
        self._down_since = trio.current_time()
        self._log.warning("broker_disconnected", url=self._url, error=error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no reply in time"
    return f"{type(exc).__name__}: {exc}"


def default_node_id() -> str:
    """host:pid:random — readable in the lease key (`GET prefix:leader`), unique per start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisBroker:
    """The supervised service of a node in a redis cluster (``[broker] kind = "redis"``).

    State lives on the object, so a supervisor restart of `run` carries on: the mirror reads on
    from the last entry it applied, and the election starts over as a follower.
    """

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        log: FilteringBoundLogger,
        *,
        generator_log: FilteringBoundLogger | None = None,
        node_id: str | None = None,
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._log = log
        self._generator_log = generator_log or log
        self.node_id = node_id or default_node_id()
        self.lease = settings.broker.lease
        prefix = settings.broker.prefix
        self._lease_key = lease_key(prefix)
        self._keys = {symbol: stream_key(prefix, symbol) for symbol in hub.symbols}
        self._symbol_of = {key: symbol for symbol, key in self._keys.items()}
        self._last_ids: dict[str, str] = {}  # stream key → id of the last entry applied
        self._loaded = False  # the recent entries of every stream are in the local history
        self._mirrored: set[str] = set()  # symbols whose local history follows the stream
        self.link = Link(log, settings.broker.url)
        self._election = Election(self.lease)
        self._term: trio.CancelScope | None = None  # while leading: cancels the generator
        self.terms = 0  # times elected
        self._client: coredis.Redis[bytes] | None = None

    # ------------------------------------------------------------------ public state

    @property
    def problem(self) -> str | None:
        """Why this node is not ready because of the broker, or None."""
        if self.link.connected is False:
            return f"broker: redis unavailable ({self.link.error})"
        if not self._loaded:
            return "broker: history not loaded from redis yet"
        return None

    @property
    def leading(self) -> bool:
        return self._election.leading(trio.current_time())

    # ------------------------------------------------------------------ the service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mirror the streams and take part in the election until cancelled.

        Reports started once the recent history was loaded from Redis, or the first attempt
        failed (the node then serves its clients, not ready, and keeps trying). Cancellation:
        at any await; a lease held is given up on the way out (best effort, shielded, bounded).
        """
        url = self._settings.broker.url
        timeout = self._request_timeout
        client = coredis.Redis.from_url(url, connect_timeout=timeout, stream_timeout=None)
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._publish_script = client.register_script(PUBLISH_SCRIPT)
        self._election = Election(self.lease)  # a restarted run starts as a follower
        async with client:
            self._client = client
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._mirror_loop)
                    nursery.start_soon(self._election_loop, nursery)
                    task_status.started()
            finally:
                self._client = None
                await self._give_up_lease()

    @property
    def _request_timeout(self) -> float:
        """How long one lease request may take: a quarter of the lease, so a hung connection
        is noticed while two renewals still fit in the lease."""
        return max(0.05, self.lease / 4)

    # ------------------------------------------------------------------ mirror

    async def _mirror_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Apply every stream entry, in order, to the hub. Never raises for Redis trouble."""
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        started = False
        while True:
            try:
                if not self._loaded:
                    await self._load_recent()
                    self._loaded = True
                if not started:
                    task_status.started()
                    started = True
                await self._read_new()
                self.link.up()
                backoff.reset()
            except UNAVAILABLE as exc:
                self.link.down(exc)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(backoff.next())

    async def _load_recent(self) -> None:
        """The newest `history.size` entries of each stream into the local history."""
        client = self._require_client()
        size = self._settings.history.size
        for symbol, key in self._keys.items():
            with trio.fail_after(max(2.0, self.lease)):
                entries = await client.xrevrange(key, "+", "-", count=size)
            for entry in reversed(entries):
                self._apply(symbol, entry.identifier, entry.field_values)
            self._last_ids.setdefault(key, "0-0")
        self.link.up()
        self._log.info(
            "broker_history_loaded",
            symbols={s: len(self._hub.history[s]) for s in self._keys},
            latest_seq={s: self._hub.history[s].latest_seq for s in self._mirrored},
        )

    async def _read_new(self) -> None:
        """One blocking XREAD over every stream from the last applied entries."""
        client = self._require_client()
        with trio.fail_after(XREAD_BLOCK + self._request_timeout + 1.0):
            reply = await client.xread(
                dict(self._last_ids), count=XREAD_COUNT, block=int(XREAD_BLOCK * 1000)
            )
        for key, entries in (reply or {}).items():
            name = key.decode() if isinstance(key, bytes) else key
            symbol = self._symbol_of[name]
            for entry in entries:
                self._apply(symbol, entry.identifier, entry.field_values)

    def _apply(self, symbol: str, identifier: bytes | str, fields: Any) -> None:
        """Hand one entry to the hub unless the local history has it already."""
        key = self._keys[symbol]
        self._last_ids[key] = identifier.decode() if isinstance(identifier, bytes) else identifier
        try:
            update = decode_entry(symbol, identifier, fields)
        except BadEntry as exc:
            self._log.warning("broker_entry_rejected", symbol=symbol, error=str(exc))
            return
        ring = self._hub.history[symbol]
        mirrored = symbol in self._mirrored
        relation = continuity(ring.next_seq, update.seq, mirrored=mirrored)
        if relation is Continuity.SEEN:
            return
        if relation is Continuity.JUMP and mirrored:
            # Entries were trimmed while this node could not read, or Redis lost its data.
            self._log.warning(
                "broker_stream_discontinuity",
                symbol=symbol,
                expected_seq=ring.next_seq,
                seq=update.seq,
            )
        self._hub.publish_encoded(symbol, update.seq, update.payload, update.message)
        self._mirrored.add(symbol)

    # ------------------------------------------------------------------ election

    async def _election_loop(self, nursery: trio.Nursery) -> None:
        """Take the lease when free, renew it while ours; lead while it is. Never raises for
        Redis trouble: a failed request is retried, and a lease not renewed in time ends the
        term (the term's deadline does that even while a request hangs)."""
        election = self._election
        lease_ms = int(self.lease * 1000)
        while True:
            await trio.sleep_until(election.next_attempt_at())
            sent_at = trio.current_time()
            role = election.attempting(sent_at)
            try:
                with trio.fail_after(self._request_timeout):
                    script = self._acquire if role is Role.FOLLOWER else self._renew
                    reply = await script(keys=[self._lease_key], args=[self.node_id, lease_ms])
                    granted = reply == 1
            except UNAVAILABLE as exc:
                self.link.down(exc)
                transition = election.failed(trio.current_time())
            else:
                self.link.up()
                transition = election.replied(sent_at, bool(granted))
            self._on_transition(transition, nursery)

    def _on_transition(self, transition: Transition | None, nursery: trio.Nursery) -> None:
        if transition is Transition.ELECTED:
            self.terms += 1
            self._term = trio.CancelScope(deadline=self._election.valid_until)
            nursery.start_soon(self._lead, self._term)
        elif transition is not None:
            self._end_term(transition.value)
        elif self._term is not None:
            self._term.deadline = self._election.valid_until  # renewed: lead on

    def _step_down(self, reason: str) -> None:
        """Be a follower from now on (the lease, if still ours in Redis, simply expires)."""
        self._election.resign()
        self._end_term(reason)

    def _end_term(self, reason: str) -> None:
        """Stop generating now: the lease is not (or may not be) ours any more."""
        if self._term is not None:
            self._term.cancel()
            self._term = None
            self._log.warning("leader_lost", node=self.node_id, reason=reason)

    async def _lead(self, term: trio.CancelScope) -> None:
        """Generate and publish until `term` is cancelled (deposed, or its deadline: the lease
        ran out unrenewed). Continues each symbol's seq and series from its stream's top."""
        started = trio.current_time()
        with term:
            try:
                await self._generate(started)
            except UNAVAILABLE as exc:  # reading the tops failed: step down, try again later
                self.link.down(exc)
                self._log.warning("leader_term_failed", node=self.node_id, error=_describe(exc))
        if self._term is term:
            # The deadline passed before the election loop noticed (or the term failed): it is
            # over all the same, and a lease renewed meanwhile must not outlive the generator.
            self._step_down("expired" if term.cancelled_caught else "failed")

    async def _generate(self, started: float) -> None:
        tops, recent = await self._read_tops()
        next_seqs = {symbol: next_seq_after(top) for symbol, top in tops.items()}
        send, receive = trio.open_memory_channel[list[Bar]](1)
        generator = Generator(self._settings.generator.spec(), send, self._generator_log)
        await trio.to_thread.run_sync(generator.continue_from, recent)
        self._log.info(
            "leader_elected",
            node=self.node_id,
            lease_s=self.lease,
            next_seq=next_seqs,
            prepared_ms=round((trio.current_time() - started) * 1000, 1),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(generator.run)
            async for batch in receive:
                await self._publish(batch, next_seqs)

    async def _read_tops(self) -> tuple[dict[str, int | None], dict[str, list[dict[str, Any]]]]:
        """Each stream's top seq (None: empty), and the `data` of its newest updates, oldest
        first: enough bars to carry on the estimator windows and the GARCH fit."""
        client = self._require_client()
        generator = self._settings.generator
        count = max(generator.garch_fit.window, generator.volatility_window) + 1
        tops: dict[str, int | None] = {}
        recent: dict[str, list[dict[str, Any]]] = {}
        for symbol, key in self._keys.items():
            with trio.fail_after(max(2.0, self.lease)):
                entries = await client.xrevrange(key, "+", "-", count=count)
            tops[symbol] = seq_of(entries[0].identifier) if entries else None
            updates = []
            for entry in reversed(entries):
                try:
                    updates.append(decode_entry(symbol, entry.identifier, entry.field_values))
                except BadEntry:
                    updates.clear()  # only an unbroken run of our own updates up to the top
            recent[symbol] = [u.message["data"] for u in updates]
        return tops, recent

    async def _publish(self, batch: Sequence[Bar], next_seqs: dict[str, int]) -> None:
        """Append one batch to the streams, atomically, while the lease is ours (a batch may
        hold several bars of a symbol, in series order, when the generator catches up).

        Retries Redis failures until it succeeds or the term ends; a batch that reached Redis
        although its reply was lost is recognised, not published twice."""
        published = datetime.now(UTC)
        maxlen = self._settings.history.size
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        uncertain = False  # a previous attempt may have been applied
        while True:
            following = dict(next_seqs)  # each symbol's next seq after this batch
            seqs = []
            for bar in batch:
                seqs.append(following[bar.symbol])
                following[bar.symbol] += 1
            args: list[str | bytes | int] = [self.node_id, maxlen]
            for bar, seq in zip(batch, seqs, strict=True):
                args += [seq, protocol.encode(protocol.update_message(bar, seq, published))]
            keys = [self._lease_key, *(self._keys[bar.symbol] for bar in batch)]
            try:
                with trio.fail_after(self._request_timeout):
                    reply = await self._publish_script(keys=keys, args=args)
            except UNAVAILABLE as exc:
                self.link.down(exc)
                uncertain = True
                await trio.sleep(backoff.next())
                continue
            if reply == 0:
                break
            if reply == -1:  # the lease is another node's: stop at once
                self._step_down("deposed")
                await trio.sleep_forever()  # cancelled by _step_down
            symbol, top = batch[int(reply[0]) - 1].symbol, int(reply[1])
            if uncertain and top == following[symbol] - 1:
                break  # the earlier attempt was applied; its reply was lost
            self._log.warning(
                "broker_seq_resync", symbol=symbol, expected_seq=next_seqs[symbol], stream_top=top
            )
            next_seqs[symbol] = top + 1
            uncertain = False
        next_seqs.update(following)

    async def _give_up_lease(self) -> None:
        """On the way out, release a lease still ours so another node takes over at once.

        A client of its own, inside the shield: the service's client is being cancelled with
        everything else (its connections belong to its own, cancelled, task group)."""
        if self._election.role is not Role.LEADER:
            return
        self._step_down("stopped")
        with trio.CancelScope(shield=True), trio.move_on_after(self._request_timeout):
            try:
                url = self._settings.broker.url
                client = coredis.Redis.from_url(url, connect_timeout=self._request_timeout)
                async with client:
                    release = client.register_script(RELEASE_SCRIPT)
                    await release(keys=[self._lease_key], args=[self.node_id])
                self._log.info("leader_released", node=self.node_id)
            except UNAVAILABLE as exc:  # it expires by itself
                self._log.info("leader_release_failed", node=self.node_id, error=_describe(exc))
        self._election = Election(self.lease)

    def _require_client(self) -> coredis.Redis[bytes]:
        if self._client is None:
            raise RuntimeError("the broker is not running")
        return self._client
