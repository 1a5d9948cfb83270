"""Each caller's share of the server: how many calls it may have in flight, how fast it may call.

Why: the server's event loop, its coordinator lock and its memory are shared by every worker, so
one worker — Byzantine, with a valid token — must not be able to take more than its share. Every
authenticated call enters `Admission.enter(row, group)` before any work is done for it:

* in flight: at most `Limits.in_flight` calls per worker and per method group at a time (an
  honest worker has one, plus a retry that overlaps a call its client gave up on);
* rate: a token bucket per worker that refills with time (`per_second`) and with every closed
  round (`per_round`), so an honest worker — a handful of calls per round — never waits, however
  fast rounds are, while a flood earns a refusal in microseconds. The time refills of all n
  workers together are capped (`total_per_second`, see `Limits.worker_rate`): the server's
  capacity does not grow with n, so neither may what f Byzantine workers can spend of it;
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
    #: Cap on the time refills of all workers together (calls/s), and the floor of one
    #: worker's: see `worker_rate`.
    total_per_second: float = 2000.0
    min_per_second: float = 2.0
    #: Rows of Status's per-worker table that cost as much as one call: see `status_cost`.
    status_rows_per_call: int = 64
    #: Status calls per second without a credential, all callers together.
    anonymous_per_second: float = 20.0
    #: Health watches and reflection streams open at once, all callers together (they need no
    #: credential; each also ends after `max_poll_seconds`: byzps.server.side_services).
    anonymous_streams: int = 8
    #: Longest a long-poll is held on the server; the client then asks again.
    max_poll_seconds: float = 20.0
    #: Longest one reply message may wait for the reader's flow-control window before the call
    #: is cut off (a stalled reader holds nothing after that).
    stall_seconds: float = 30.0

    def worker_rate(self, num_workers: int) -> tuple[float, float]:
        """(refill per second, bucket size) of each of `num_workers` workers' buckets.

        Why scaled: the per-worker figures are absolute, but what the server can serve is not
        per worker — it is one process (measured on 2 cores: ~400 pushes/s with their model
        fetches, whether n is 200 or 1,000). With absolute budgets, f Byzantine workers could
        spend f × 50 calls/s: at n = 1,000 and f = 100, 5,000 calls/s, over ten times what the
        server serves, so each of them took more than its 1/n share, and more the larger n.
        So the time refills of all workers together stay within `total_per_second`: a worker
        gets min(per_second, total_per_second / n), the bucket shrinks in proportion, and f
        workers can spend at most f / n of the total. Nothing changes up to n = total_per_second /
        per_second (40 workers by default).

        The floors keep an honest worker whole: `min_per_second` (2/s) is above what it calls
        when no round closes — one long-poll per `max_poll_seconds` (20 s) and retries backing
        off from 50 ms, doubling, to 2 s, which average under 1/s once the bucket has absorbed
        the first few — and a bucket of at least 2 × `per_round` holds a closed round's refill
        (the calls a round needs: a fetch and a push, a re-register after a failure) with room
        for the retries of the round before."""
        n = max(1, num_workers)
        scale = min(1.0, self.total_per_second / (n * self.per_second))
        rate = max(min(self.per_second, self.min_per_second), self.per_second * scale)
        burst = max(min(self.burst, 2.0 * self.per_round), self.burst * scale, 1.0)
        return rate, burst

    def status_cost(self, num_workers: int) -> float:
        """Tokens a Status call with the per-worker table takes (a worker's or the operator's;
        an anonymous one gets no table and takes one from the shared bucket).

        Why: its reply has a line per worker, listed under the coordinator's lock and encoded on
        the event loop — 4.3 ms at n = 1,000 (measured), where a push is ~1 ms of server time —
        so at one token a call, each worker's Status budget bought O(n) work, and f Byzantine
        workers O(f·n): more than their share, and more the larger n. At one token per
        `status_rows_per_call` rows (64 rows ≈ 0.3 ms, an ordinary call's cost) a Status call
        costs what it makes the server do; up to 64 workers it is one token, as before."""
        return max(1.0, num_workers / self.status_rows_per_call)

    def __post_init__(self) -> None:
        for name in ("per_second", "burst", "anonymous_per_second", "total_per_second"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.status_rows_per_call < 1:
            raise ValueError("status_rows_per_call must be at least 1")
        for name in ("in_flight", "anonymous_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.min_per_second < 0:
            raise ValueError("min_per_second must be non-negative")
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

    def take(self, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many (a call dearer than the bucket holds is
        refused as if the bucket were empty: it takes `cost`, capped at the capacity)."""
        now = self._clock()
        self.add((now - self._stamp) * self.rate)
        self._stamp = now
        cost = min(cost, self.capacity)
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True


class Admission:
    """Admits or refuses calls by who makes them (see the module doc)."""

    def __init__(
        self, limits: Limits, num_workers: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        #: Each worker's refill per second and bucket size (`Limits.worker_rate`).
        self.per_second, self.burst = limits.worker_rate(num_workers)
        # One bucket per worker row, and row n for the operator's credential (one caller: the
        # unscaled budget).
        self._buckets = [
            TokenBucket(self.per_second, self.burst, clock) for _ in range(num_workers)
        ]
        self._buckets.append(TokenBucket(limits.per_second, limits.burst, clock))
        anonymous = limits.anonymous_per_second
        self._anonymous = TokenBucket(anonymous, 2 * anonymous, clock)
        self._in_flight: dict[tuple[int, Group], int] = {}
        self._anonymous_streams = 0
        #: Calls refused so far, by reason (exposed for tests and benchmarks).
        self.refused = {"in_flight": 0, "rate": 0, "anonymous": 0, "anonymous_streams": 0}

    def take_anonymous(self) -> None:
        """Spend one token of the bucket all callers without a credential share, or
        Rejected(RESOURCE_EXHAUSTED) with a retry hint."""
        if not self._anonymous.take():
            self.refused["anonymous"] += 1
            raise Rejected(
                Refusal.RESOURCE_EXHAUSTED,
                "too many calls without a credential; retry later",
                retry_after=1.0 / self.limits.anonymous_per_second,
            )

    @contextmanager
    def anonymous_stream(self) -> Iterator[None]:
        """Hold one of the `Limits.anonymous_streams` slots that every caller without a
        credential shares, for a stream it keeps open (a health watch, a reflection stream);
        opening one also takes an anonymous token. Rejected(RESOURCE_EXHAUSTED) when all are
        held: a flood of them can hold only these few, never the server's memory."""
        if self._anonymous_streams >= self.limits.anonymous_streams:
            self.refused["anonymous_streams"] += 1
            raise Rejected(
                Refusal.RESOURCE_EXHAUSTED,
                f"{self._anonymous_streams} streams without a credential are open; retry later",
                retry_after=IN_FLIGHT_RETRY_SECONDS,
            )
        self.take_anonymous()
        self._anonymous_streams += 1
        try:
            yield
        finally:
            self._anonymous_streams -= 1

    def round_closed(self) -> None:
        """Every worker earns `per_round` more calls."""
        for bucket in self._buckets:
            bucket.add(self.limits.per_round)

    @contextmanager
    def enter(self, row: int | None, group: Group, cost: float = 1.0) -> Iterator[None]:
        """Hold one of `row`'s `group` slots for the duration of the call (row None: an
        anonymous call); Rejected(RESOURCE_EXHAUSTED) when over the share. `cost`: the tokens
        the call takes from `row`'s bucket (`Limits.status_cost`; anonymous calls take one)."""
        if row is None:
            self.take_anonymous()
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
        if not self._buckets[row].take(cost):
            self.refused["rate"] += 1
            raise Rejected(
                Refusal.RESOURCE_EXHAUSTED,
                f"worker {row} is calling too fast; retry later",
                retry_after=1.0 / self._buckets[row].rate,
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
