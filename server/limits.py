"""Each caller's share of the server: how many calls it may have in flight, how fast it may call.

Why: the server's event loop, its coordinator lock and its memory are shared by every worker, so
one worker — Byzantine, with a valid token — must not be able to take more than its share. Every
authenticated call enters `Admission.enter(row, group)` before any work is done for it:

* in flight: at most `Limits.in_flight` calls per worker and per method group at a time (an
  honest worker has one, plus a retry that overlaps a call its client gave up on);
* rate: a token bucket per worker that refills with time (`per_second`) and with every closed
  round (`per_round`), so an honest worker — a handful of calls per round — never waits, however
  fast rounds are, while a flood earns a refusal in microseconds;
* anonymous calls (Status without a token) share one bucket, `anonymous_per_second`: a flood of
  them can only make Status answer RESOURCE_EXHAUSTED, never slow a worker.

A refused call ends with RESOURCE_EXHAUSTED before it is parsed further, with a suggested delay
in the `byzps-retry-after-ms` trailing metadata: the client's sign that this refusal — unlike a
request too large, also RESOURCE_EXHAUSTED — is worth retrying. Not thread-safe by design: only
the servicer's event loop calls it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from byzps.server.validation import Refusal, Rejected

#: Suggested wait after an in-flight refusal: long enough for a held call to end or be cancelled.
IN_FLIGHT_RETRY_SECONDS = 0.2


class Group(enum.Enum):
    """Methods that share one in-flight budget."""

    REGISTER = "Register"
    PUSH = "PushUpdate"
    MODEL = "GetModel"  # GetModel and GetModelUpdate
    STATUS = "Status"


@dataclass(frozen=True)
class Limits:
    """Per-worker fair-share limits of one server (operational, not part of the run config)."""

    #: Calls of one worker in flight at once, per method group.
    in_flight: int = 4
    #: Token-bucket refill per second and per closed round, and the bucket's size, per worker.
    per_second: float = 50.0
    per_round: float = 16.0
    burst: float = 256.0
    #: Status calls per second without a credential, all callers together.
    anonymous_per_second: float = 20.0
    #: Longest a long-poll is held on the server; the client then asks again.
    max_poll_seconds: float = 20.0
    #: Longest one reply message may wait for the reader's flow-control window before the call
    #: is cut off (a stalled reader holds nothing after that).
    stall_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("per_second", "burst", "anonymous_per_second"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        if self.per_round < 0:
            raise ValueError("per_round must be non-negative")
        if not (self.max_poll_seconds > 0 and self.stall_seconds > 0):
            raise ValueError("max_poll_seconds and stall_seconds must be positive")


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second; `take()` spends one if there is one."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock()

    def add(self, tokens: float) -> None:
        self._tokens = min(self.capacity, self._tokens + tokens)

    def take(self) -> bool:
        now = self._clock()
        self.add((now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Admission:
    """Admits or refuses calls by who makes them (see the module doc)."""

    def __init__(
        self, limits: Limits, num_workers: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        # One bucket per worker row, and row n for the operator's credential.
        self._buckets = [
            TokenBucket(limits.per_second, limits.burst, clock) for _ in range(num_workers + 1)
        ]
        anonymous = limits.anonymous_per_second
        self._anonymous = TokenBucket(anonymous, 2 * anonymous, clock)
        self._in_flight: dict[tuple[int, Group], int] = {}
        #: Calls refused so far, by reason (exposed for tests and benchmarks).
        self.refused = {"in_flight": 0, "rate": 0, "anonymous": 0}

    def round_closed(self) -> None:
        """Every worker earns `per_round` more calls."""
        for bucket in self._buckets:
            bucket.add(self.limits.per_round)

    @contextmanager
    def enter(self, row: int | None, group: Group) -> Iterator[None]:
        """Hold one of `row`'s `group` slots for the duration of the call (row None: an
        anonymous call); Rejected(RESOURCE_EXHAUSTED) when over the share."""
        if row is None:
            if not self._anonymous.take():
                self.refused["anonymous"] += 1
                raise Rejected(
                    Refusal.RESOURCE_EXHAUSTED,
                    "too many calls without a credential; retry later",
                    retry_after=1.0 / self.limits.anonymous_per_second,
                )
            yield
            return
        key = (row, group)
        held = self._in_flight.get(key, 0)
        if held >= self.limits.in_flight:
            self.refused["in_flight"] += 1
            raise Rejected(
                Refusal.RESOURCE_EXHAUSTED,
                f"worker {row} already has {held} {group.value} calls in flight",
                retry_after=IN_FLIGHT_RETRY_SECONDS,
            )
        if not self._buckets[row].take():
            self.refused["rate"] += 1
            raise Rejected(
                Refusal.RESOURCE_EXHAUSTED,
                f"worker {row} is calling too fast; retry later",
                retry_after=1.0 / self.limits.per_second,
            )
        self._in_flight[key] = held + 1
        try:
            yield
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
