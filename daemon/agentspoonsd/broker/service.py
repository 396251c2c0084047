"""The redis broker service: one node of a cluster that shares one Redis.

Task tree (under the supervisor's ``broker`` service)::

    RedisBroker.run          the coredis client (anyio, here on Trio)
    ├── _mirror_loop         stream entries → the local hub (history, resume, broadcast)
    └── _election_loop       the lease: take it, renew it, lose it
        └── _lead            while the lease is ours: the generator and the publisher

The pieces: `mirror.StreamMirror` (which entries the local history needs), `election.Election`
(the lease's state machine), `publication.Publication` (a batch's seqs and the script's replies)
are pure; `availability.Link` tracks whether Redis answers; `publisher` holds the leader's
Redis I/O. This module drives them.

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
from collections.abc import Mapping
from typing import Any

import coredis
import trio
from structlog.typing import FilteringBoundLogger

from ..backoff import Backoff
from ..hub import Hub
from ..market.bar import Bar
from ..market.generator import Generator
from ..settings import Settings
from .availability import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    LINK_GRACE,
    UNAVAILABLE,
    Link,
    describe,
)
from .election import (
    ACQUIRE_SCRIPT,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
    Election,
    Role,
    Transition,
)
from .entries import PUBLISH_SCRIPT, lease_key, next_seq_after
from .mirror import Mirrored, Rejected, StreamMirror
from .publisher import Publisher, read_tops

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "LINK_GRACE",
    "UNAVAILABLE",
    "XREAD_BLOCK",
    "XREAD_COUNT",
    "Backoff",
    "Link",
    "RedisBroker",
    "default_node_id",
]

XREAD_BLOCK = 1.0  # seconds a blocking XREAD waits for new entries before asking again
XREAD_COUNT = 1000  # entries per stream per XREAD (catching up after an outage)


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
        self._lease_key = lease_key(settings.broker.prefix)
        self._mirror = StreamMirror(settings.broker.prefix, hub.symbols)
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
        if not self._mirror.loaded:
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
        self._publisher = Publisher(
            client.register_script(PUBLISH_SCRIPT),
            lease_key=self._lease_key,
            keys=self._mirror.keys,
            node_id=self.node_id,
            maxlen=self._settings.history.size,
            timeout=timeout,
            link=self.link,
            log=self._log,
        )
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
                if not self._mirror.loaded:
                    await self._load_recent()
                    self._mirror.loaded = True
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
        for symbol, key in self._mirror.keys.items():
            with trio.fail_after(max(2.0, self.lease)):
                entries = await client.xrevrange(key, "+", "-", count=size)
            for entry in reversed(entries):
                self._apply(symbol, entry.identifier, entry.field_values)
            self._mirror.loaded_stream(symbol)
        self.link.up()
        self._log.info(
            "broker_history_loaded",
            symbols={s: len(self._hub.history[s]) for s in self._mirror.keys},
            latest_seq={s: self._hub.history[s].latest_seq for s in self._mirror.mirrored},
        )

    async def _read_new(self) -> None:
        """One blocking XREAD over every stream from the last applied entries."""
        client = self._require_client()
        with trio.fail_after(XREAD_BLOCK + self._request_timeout + 1.0):
            reply = await client.xread(
                self._mirror.positions(), count=XREAD_COUNT, block=int(XREAD_BLOCK * 1000)
            )
        for key, entries in (reply or {}).items():
            symbol = self._mirror.symbol_of(key)
            for entry in entries:
                self._apply(symbol, entry.identifier, entry.field_values)

    def _apply(self, symbol: str, identifier: bytes | str, fields: Mapping[Any, Any]) -> None:
        """Hand one entry to the hub unless the local history has it already."""
        ring = self._hub.history[symbol]
        action = self._mirror.entry(symbol, identifier, fields, ring.next_seq)
        if isinstance(action, Rejected):
            self._log.warning("broker_entry_rejected", symbol=symbol, error=action.error)
        elif isinstance(action, Mirrored):
            if action.expected_seq is not None:
                self._log.warning(
                    "broker_stream_discontinuity",
                    symbol=symbol,
                    expected_seq=action.expected_seq,
                    seq=action.update.seq,
                )
            update = action.update
            self._hub.publish_encoded(symbol, update.seq, update.payload, update.message)

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
                    reply: Any = await script(keys=[self._lease_key], args=[self.node_id, lease_ms])
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
                self._log.warning("leader_term_failed", node=self.node_id, error=describe(exc))
        if self._term is term:
            # The deadline passed before the election loop noticed (or the term failed): it is
            # over all the same, and a lease renewed meanwhile must not outlive the generator.
            self._step_down("expired" if term.cancelled_caught else "failed")

    async def _generate(self, started: float) -> None:
        spec = self._settings.generator
        count = max(spec.garch_fit.window, spec.volatility_window) + 1
        client = self._require_client()
        tops, recent = await read_tops(client, self._mirror.keys, count, max(2.0, self.lease))
        next_seqs = {symbol: next_seq_after(top) for symbol, top in tops.items()}
        send, receive = trio.open_memory_channel[list[Bar]](1)
        generator = Generator(spec.spec(), send, self._generator_log)
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
                if not await self._publisher.publish(batch, next_seqs):
                    self._step_down("deposed")  # the lease is another node's: stop at once
                    await trio.sleep_forever()  # cancelled by _step_down

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
                self._log.info("leader_release_failed", node=self.node_id, error=describe(exc))
        self._election = Election(self.lease)

    def _require_client(self) -> coredis.Redis[bytes]:
        if self._client is None:
            raise RuntimeError("the broker is not running")
        return self._client
