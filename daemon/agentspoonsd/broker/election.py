"""Who generates: a lease in Redis, held by one node at a time. Pure state machine, no I/O.

The lease is one key (``{prefix}:leader``) whose value is the holder's node id, set with
``SET key id NX PX lease`` (take it when nobody holds it; `ACQUIRE_SCRIPT`) and renewed with a
compare-and-renew script (extend it only while the value is still our id: a node never extends
another's lease).

Local time is the judge of how long the lease is ours: it counts from when the request that got
it was *sent*, which is no later than when Redis set the expiry, so the node stops believing it
leads no later than Redis lets the key expire. The leader renews every `lease / 3` (two renewals
can fail before the lease runs out); a follower tries every `lease / 4`, so a dead leader's
lease is taken over within `lease + lease / 4` (plus one round trip) of its last renewal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

RENEW_FRACTION = 1 / 3
RETRY_FRACTION = 1 / 4

# Take the lease: SET NX PX when nobody holds it. Also 1 when it is already ours (a node whose
# term ended on its own deadline while a renewal was in flight takes it back at once instead of
# waiting for its own key to expire; nobody else could publish meanwhile: publishing checks the
# holder). 1: ours now, 0: another node's.
ACQUIRE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""

# Renew only our own lease: PEXPIRE if the value is still ours. 1: renewed, 0: not ours (or gone).
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Give the lease up (on shutdown) only if it is ours, so a follower need not wait for expiry.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Role(Enum):
    FOLLOWER = "follower"
    LEADER = "leader"


class Transition(Enum):
    ELECTED = "elected"  # the lease is now ours: start generating
    DEPOSED = "deposed"  # Redis says the lease is not ours (expired and maybe taken): stop
    EXPIRED = "expired"  # no renewal confirmed in time (Redis unreachable): stop


@dataclass
class Election:
    """The lease as one node sees it. Feed it the replies; it says when to ask next.

    `now`/`sent_at` are any monotonic clock's seconds (the daemon: `trio.current_time()`).
    """

    lease: float
    role: Role = Role.FOLLOWER
    valid_until: float = float("-inf")  # local deadline of the lease while leading
    _next_at: float = field(default=float("-inf"), repr=False)

    @property
    def renew_interval(self) -> float:
        return self.lease * RENEW_FRACTION

    @property
    def retry_interval(self) -> float:
        return self.lease * RETRY_FRACTION

    def attempting(self, sent_at: float) -> Role:
        """Record that a request is sent now; returns which one: FOLLOWER → SET NX (acquire),
        LEADER → the renew script."""
        self._schedule(sent_at)
        return self.role

    def replied(self, sent_at: float, granted: bool) -> Transition | None:
        """The reply to the request sent at `sent_at`: granted (SET NX took it, or the renew
        script extended it) or not."""
        transition = None
        if granted:
            self.valid_until = sent_at + self.lease
            if self.role is Role.FOLLOWER:
                self.role = Role.LEADER
                transition = Transition.ELECTED
        elif self.role is Role.LEADER:
            transition = self._step_down(Transition.DEPOSED)
        self._schedule(sent_at)
        return transition

    def failed(self, now: float) -> Transition | None:
        """The request got no reply (Redis unreachable, or too slow): try again after half the
        follower interval; step down if the lease has run out meanwhile."""
        transition = self.check(now)
        self._next_at = now + self.retry_interval / 2
        return transition

    def check(self, now: float) -> Transition | None:
        """Step down once the lease has run out without a confirmed renewal."""
        if self.role is Role.LEADER and now >= self.valid_until:
            return self._step_down(Transition.EXPIRED)
        return None

    def next_attempt_at(self) -> float:
        """When to send the next request: a leader renews every lease/3 (never later than its
        lease lasts), a follower tries every lease/4."""
        if self.role is Role.LEADER:
            return min(self._next_at, self.valid_until)
        return self._next_at

    def _schedule(self, sent_at: float) -> None:
        interval = self.renew_interval if self.role is Role.LEADER else self.retry_interval
        self._next_at = sent_at + interval

    def resign(self) -> None:
        """Stop leading now, whatever the lease (the term ended on its own)."""
        if self.role is Role.LEADER:
            self._step_down(Transition.DEPOSED)

    def leading(self, now: float) -> bool:
        return self.role is Role.LEADER and now < self.valid_until

    def _step_down(self, why: Transition) -> Transition:
        self.role = Role.FOLLOWER
        self.valid_until = float("-inf")
        return why
