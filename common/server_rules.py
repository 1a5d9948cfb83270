"""Server rules: how the server turns each worker's messages into the vector it aggregates.

Every estimator in byzps fits one shape: the server keeps, for each worker j, a *base* b_j, and the
vector fed to the robust aggregator is the candidate  a_j = b_j + c_j,  where c_j is j's latest
message. What b_j is, and how it moves, is the rule:

* state (EF21 family, DASHA):  b_j = g_j, and absorbing c_j sets g_j ← g_j + c_j;
* message (CSGD, SGDm):        b_j = 0, the candidate is the message itself;
* diana:                       b_j = h_j, candidate h_j + c_j, then h_j ← h_j + a·c_j;
* marina:                      b_j = previous aggregate (or 0 in a full-gradient round).

A Byzantine worker that wants its candidate to be a target t sends C(t − b_j): knowing its own b_j
exactly is what makes every attack (docs/algorithms.md#attacks) expressible for every estimator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from byzps.common import _state_kernels as _kernels
from byzps.common.registry import Registry
from byzps.common.seeding import uniform
from byzps.common.sparse import SparseBatch

SERVER_RULES: Registry[ServerRule] = Registry("server rule")


class ServerRule(ABC):
    """Per-worker server state for n workers of dimension d, batched as (n, d) tensors."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def candidates(self) -> Tensor:
        """(n, d): the rows the robust aggregator sees (stale rows for silent workers)."""

    @abstractmethod
    def bases(self, rows: Tensor) -> Tensor:
        """(len(rows), d): b_j of the given rows; a message c_j makes the candidate b_j + c_j."""

    @abstractmethod
    def absorb(self, rows: Tensor, messages: SparseBatch, round: int) -> None:
        """Apply one message per given worker row, exactly once."""

    def admissible(self, rows: Tensor, messages: SparseBatch, round: int) -> Tensor:
        """(len(rows),) bool: True where absorbing message i would leave every value of row
        `rows[i]`'s state finite — what the server's door requires (byzps.server.validation).

        Computed with the very float32 operations `absorb` performs, at the message's support
        only (nothing else changes), so "admissible" means exactly "absorb stays finite". The
        default covers rules whose new state is the message itself.
        """
        del rows, round
        return _finite_rows(messages.values)

    def late_refusal(self, round: int) -> str | None:
        """Why a message computed for `round` cannot be absorbed now, or None: it can.

        The server absorbs every message with the round open now (`RoundEngine.absorb`), so a
        late one, computed for an earlier round, is applied as if it were current. That is
        what every rule but MARINA means to do (a late delta still lands on its worker's
        state); the default says so. Checked by the server's door before `admissible`.
        """
        del round
        return None

    def touched(self, rows: Tensor, messages: SparseBatch) -> Tensor | None:
        """The coordinates whose candidates `absorb(rows, messages)` may change, or None: all.

        Called before `absorb`. A superset is fine (the aggregate is recomputed there, and
        equals the old value where nothing changed); a missing coordinate is not — the server's
        incremental aggregation trusts this set to be complete. The default, None, is always
        safe.
        """
        del rows, messages
        return None

    @abstractmethod
    def close_round(self, aggregate: Tensor, round: int) -> None:
        """Called after aggregation with the aggregate of `round`."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------


def full_gradient_round(seed: int, round: int, p: float, key: str = "marina") -> bool:
    """The shared coin of MARINA / PAGE: round 0 is always full, round t > 0 is full with
    probability p. A pure function of (seed, key, round), so the server and every worker agree
    without exchanging anything."""
    return round == 0 or uniform(seed, key, round) < p


def _as_rows(rows: Tensor | Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)


def _check_messages(rows: Tensor, messages: SparseBatch, dim: int) -> None:
    if messages.dim != dim:
        raise ValueError(f"messages have dim {messages.dim}, expected {dim}")
    if messages.num_rows != rows.numel():
        raise ValueError(f"{rows.numel()} rows but {messages.num_rows} messages")


#: Up to this many message values, `scatter_add_rows` uses index_put_ (serial, one call);
#: above it a compiled pass (CPU float states, alpha = 1), else the flat index_add_.
SMALL_SCATTER = 4096
#: From this many values, spread over distinct rows, the compiled scatter splits the rows between
#: threads (a parallel region costs more than it shares below it, and wakes numba's pool between
#: torch ops; a live server absorbs one row per push, serially).
PARALLEL_SCATTER = 1 << 18


def scatter_add_rows(
    target: Tensor, rows: Tensor, messages: SparseBatch, alpha: float = 1.0
) -> None:
    """target[rows[i]] += alpha · messages.row(i), in place, without densifying the messages.

    Every path adds the same values in the same order, so the bits do not depend on which one
    runs: dense rows row by row, small batches by one index_put_, large CPU batches by a compiled
    pass (common/_state_kernels), anything else by one index_add_ over the (n, d) target
    addressed as a flat vector (row·d + index). A row that appears twice receives both of its
    messages.
    """
    d = target.shape[1]
    values = messages.values.to(target.dtype)
    if messages.nnz == d:
        # Dense rows (their indices are arange): row by row in batch order, without the m·d
        # flat index. alpha multiplies first, as index_add_ does (add_'s alpha fuses: other bits).
        for i, row in enumerate(rows.tolist()):
            target[row].add_(values[i] * alpha if alpha != 1.0 else values[i])
        return
    if alpha == 1.0 and values.numel() <= SMALL_SCATTER:
        # One op instead of five, the same additions in the same (serial) order: half the cost
        # of the flat index_add_ at a9a's (12, 1) messages, applied four times a simulated round.
        target.index_put_((rows[:, None], messages.indices.long()), values, accumulate=True)
        return
    if alpha == 1.0 and _numpy_view(target):
        # Large CPU batches: a compiled pass, the same one add per entry (common/_state_kernels).
        rows_np, indices = rows.numpy(), messages.indices.numpy()
        if not (_kernels.within(rows_np, target.shape[0]) and _kernels.within(indices, d)):
            raise IndexError(f"a row outside [0, {target.shape[0]}) or an index outside [0, {d})")
        shared = values.numel() >= PARALLEL_SCATTER and len(set(rows.tolist())) == len(rows) > 1
        kernel = _kernels.scatter_add_distinct_rows if shared else _kernels.scatter_add_rows
        kernel(target.numpy(), rows_np, indices, values.detach().numpy())
        return
    # Dense messages too: index_add_ along dim 0 adds row by row, one parallel region each,
    # which costs ~100 ms a round when another thread pool (numba's) is spinning on the cores.
    flat = (rows[:, None] * d + messages.indices.long()).reshape(-1)
    target.view(-1).index_add_(0, flat, values.reshape(-1), alpha=alpha)


def _numpy_view(t: Tensor) -> bool:
    """True for a contiguous CPU float32/float64 tensor, which numpy can read in place: the
    door's per-message checks below then run in numpy (the same values; at a9a's (20, 123) a
    torch reduction or gather costs several times numpy's, and the door runs twice a round)."""
    numeric = t.dtype in (torch.float32, torch.float64)
    return t.device.type == "cpu" and numeric and t.is_contiguous()


def _finite_rows(values: Tensor) -> Tensor:
    """(m,) bool: rows of an (m, k) tensor that hold only finite values."""
    if _numpy_view(values):
        return torch.from_numpy(np.isfinite(values.numpy()).all(axis=1))
    return torch.isfinite(values).all(dim=1)


def _at_support(state: Tensor, rows: Tensor, messages: SparseBatch) -> Tensor:
    """(m, k): state[rows[i], indices[i]] — the entries that message i would change."""
    if messages.nnz == state.shape[1]:  # dense messages: their support is the whole row
        if rows.numel() == 1:  # one push at a time on the server: a view, no copy
            return state[int(rows)].unsqueeze(0)
        return state.index_select(0, rows.to(state.device))
    if _numpy_view(state) and rows.device.type == "cpu":
        return torch.from_numpy(state.numpy()[rows.numpy()[:, None], messages.indices.numpy()])
    return state[rows[:, None], messages.indices.long()]


def _set_bits(row: Tensor) -> Tensor:
    """Positions of `row` that are not +0.0 (−0.0 counts: overwriting it by +0.0 is a change)."""
    return ((row != 0) | torch.signbit(row)).nonzero().reshape(-1)


class _BatchedRule(ServerRule):
    """Holds (n, d) tensors named in `_tensors` and the counters in `_counters`, and serialises
    both generically, so each rule only writes its recursion."""

    _tensors: ClassVar[tuple[str, ...]] = ()
    _counters: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        num_workers: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be positive, got {num_workers}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.num_workers = num_workers
        self.dim = dim
        for name in self._tensors:
            setattr(self, name, torch.zeros(num_workers, dim, dtype=dtype, device=device))

    @property
    def _device(self) -> torch.device:
        return getattr(self, self._tensors[0]).device

    def _prepare(
        self, rows: Tensor | Sequence[int], messages: SparseBatch
    ) -> tuple[Tensor, SparseBatch]:
        """The rows and the messages on the states' device (a GPU server receives them on the
        CPU), after checking that they fit."""
        r = _as_rows(rows, self._device)
        _check_messages(r, messages, self.dim)
        return r, messages.to(self._device)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).clone() for name in self._tensors}
        state.update({name: getattr(self, name) for name in self._counters})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in (*self._tensors, *self._counters) if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        for name in self._tensors:
            mine = getattr(self, name)
            value = torch.as_tensor(state[name])
            if value.shape != mine.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, expected {tuple(mine.shape)}"
                )
            mine.copy_(value)
        for name in self._counters:
            value = state[name]
            setattr(self, name, value.clone() if isinstance(value, Tensor) else value)


# ----------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------


@SERVER_RULES.register("state")
class StateRule(_BatchedRule):
    """Error-feedback states (EF21 family, Byz-DM21, DASHA): b_j = g_j; on c_j: g_j ← g_j + c_j.

    The candidate is g_j itself, so a silent worker keeps its stale g_j.
    """

    _tensors = ("g",)

    @property
    def candidates(self) -> Tensor:
        return self.g

    def bases(self, rows: Tensor) -> Tensor:
        return self.g.index_select(0, _as_rows(rows, self._device))

    def absorb(self, rows: Tensor, messages: SparseBatch, round: int) -> None:
        scatter_add_rows(self.g, *self._prepare(rows, messages))

    def admissible(self, rows: Tensor, messages: SparseBatch, round: int) -> Tensor:
        """g_j + c_j finite on c_j's support (two finite pushes of 3e38 overflow float32)."""
        del round
        r, messages = self._prepare(rows, messages)
        return _finite_rows(_at_support(self.g, r, messages) + messages.values.to(self.g.dtype))

    def touched(self, rows: Tensor, messages: SparseBatch) -> Tensor | None:
        """g_j += c_j changes g_j on supp(c_j) only."""
        del rows
        return messages.indices.reshape(-1)

    def close_round(self, aggregate: Tensor, round: int) -> None:
        del aggregate, round


class _CandidateRule(_BatchedRule):
    """Rules whose candidate is fixed when a message arrives: a_j = b_j + c_j is stored, and a
    silent worker's candidate stays the last one it produced (0 before its first message)."""

    _tensors: ClassVar[tuple[str, ...]] = ("candidate",)

    @property
    def candidates(self) -> Tensor:
        return self.candidate

    def _write(self, rows: Tensor, base: Tensor, messages: SparseBatch) -> None:
        base = base.clone()
        scatter_add_rows(base, torch.arange(len(rows), device=base.device), messages)
        self.candidate[rows] = base


@SERVER_RULES.register("message")
class MessageRule(_CandidateRule):
    """BR-CSGD, BR-SGDm: b_j = 0, the candidate is the latest message itself (stale if silent)."""

    def __init__(
        self,
        num_workers: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(num_workers, dim, dtype=dtype, device=device)
        # The support of each row's latest message: the coordinates the next message overwrites.
        # Not checkpointed: an unknown row falls back to the row's non-zeros (same set or larger).
        self._support: dict[int, Tensor] = {}

    def bases(self, rows: Tensor) -> Tensor:
        r = _as_rows(rows, self._device)
        return self.candidate.new_zeros(len(r), self.dim)

    def absorb(self, rows: Tensor, messages: SparseBatch, round: int) -> None:
        r, messages = self._prepare(rows, messages)
        self._write(r, self.bases(r), messages)
        for i, row in enumerate(r.tolist()):
            self._support[row] = messages.indices[i]

    def touched(self, rows: Tensor, messages: SparseBatch) -> Tensor | None:
        """The new message replaces the whole row: its support and the old message's change.

        Outside those, the old row was 0 (b_j = 0) and stays 0.
        """
        parts = [messages.indices.reshape(-1)]
        for row in _as_rows(rows, self._device).tolist():
            old = self._support.get(row)
            parts.append(old if old is not None else _set_bits(self.candidate[row]))
        return torch.cat([p.to(torch.long) for p in parts])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._support.clear()

    def close_round(self, aggregate: Tensor, round: int) -> None:
        del aggregate, round


@SERVER_RULES.register("diana")
class DianaRule(_CandidateRule):
    """BR-DIANA shifts: b_j = h_j; on c_j: candidate_j = h_j + c_j, then h_j ← h_j + a·c_j.

    A silent worker keeps its last candidate h_j^old + c_j (the last gradient estimate it gave).
    """

    _tensors = ("candidate", "h")

    def __init__(
        self,
        num_workers: int,
        dim: int,
        *,
        a: float,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0.0 < a <= 1.0:
            raise ValueError(f"a must be in (0, 1], got {a!r}")
        super().__init__(num_workers, dim, dtype=dtype, device=device)
        self.a = float(a)

    def bases(self, rows: Tensor) -> Tensor:
        return self.h[_as_rows(rows, self._device)]

    def absorb(self, rows: Tensor, messages: SparseBatch, round: int) -> None:
        r, messages = self._prepare(rows, messages)
        self._write(r, self.h[r], messages)
        scatter_add_rows(self.h, r, messages, alpha=self.a)

    def admissible(self, rows: Tensor, messages: SparseBatch, round: int) -> Tensor:
        """Both the candidate h_j + c_j and the new shift h_j + a·c_j finite."""
        del round
        r, messages = self._prepare(rows, messages)
        h = _at_support(self.h, r, messages)
        c = messages.values.to(self.h.dtype)
        return _finite_rows(h + c) & _finite_rows(h + self.a * c)

    def close_round(self, aggregate: Tensor, round: int) -> None:
        del aggregate, round


@SERVER_RULES.register("marina")
class MarinaRule(_CandidateRule):
    """Byz-VR-MARINA: in a full-gradient round (shared coin, round 0 always) candidate_j = c_j;
    otherwise candidate_j = ĝ^{t−1} + c_j with ĝ^{t−1} the previous round's aggregate.

    The coin of a message is that of the round it was computed for; the base is the latest recorded
    aggregate (MARINA keeps no per-worker memory, so a late delta is applied to the current base).
    `round` is the round open now (one past the last closed one); `bases` uses its coin, and so
    does `absorb` on the server, which is called with it. A late message whose round's coin
    differs from the open round's — a full gradient once a compressed round is open, or a
    compressed delta in a full round — cannot be applied as computed, so the server's door
    refuses it (`late_refusal`): applied with the open round's coin, a full gradient would be
    added to ĝ^{t−1} (and a Byzantine one, checked against base 0, could overflow there).
    """

    _tensors = ("candidate",)
    _counters = ("round",)

    def __init__(
        self,
        num_workers: int,
        dim: int,
        *,
        p: float,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        super().__init__(num_workers, dim, dtype=dtype, device=device)
        self.p = float(p)
        self.seed = int(seed)
        self.round = 0
        self.last_aggregate = self.candidate.new_zeros(dim)

    def is_full(self, round: int) -> bool:
        return full_gradient_round(self.seed, round, self.p)

    def _base(self, n: int, round: int) -> Tensor:
        if self.is_full(round):
            return self.candidate.new_zeros(n, self.dim)
        return self.last_aggregate.expand(n, self.dim).clone()

    def bases(self, rows: Tensor) -> Tensor:
        return self._base(len(_as_rows(rows, self._device)), self.round)

    def absorb(self, rows: Tensor, messages: SparseBatch, round: int) -> None:
        r, messages = self._prepare(rows, messages)
        self._write(r, self._base(len(r), round), messages)

    def late_refusal(self, round: int) -> str | None:
        """A message of `round` applies now only under the same coin as the open round."""
        full = self.is_full(round)
        if full == self.is_full(self.round):
            return None

        def kind(full: bool) -> str:
            return "a full-gradient" if full else "a compressed"

        return (
            f"round {round} is {kind(full)} round and round {self.round}, open now, is "
            f"{kind(not full)} one: MARINA applies a message under its own round's coin, so this "
            "one can no longer be applied"
        )

    def admissible(self, rows: Tensor, messages: SparseBatch, round: int) -> Tensor:
        """The candidate base + c_j finite, with the base `absorb` would use for `round` — the
        same as for the open round whenever `late_refusal(round)` lets the message through."""
        r, messages = self._prepare(rows, messages)
        base = _at_support(
            self._base(len(r), round), torch.arange(len(r), device=r.device), messages
        )
        return _finite_rows(base + messages.values.to(base.dtype))

    def close_round(self, aggregate: Tensor, round: int) -> None:
        self.last_aggregate = aggregate.detach().to(self.candidate).clone()
        self.round = round + 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_aggregate": self.last_aggregate.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "last_aggregate" not in state:
            raise ValueError("state is missing ['last_aggregate']")
        self.last_aggregate = torch.as_tensor(state["last_aggregate"]).to(self.candidate).clone()


def build_server_rule(name: str, num_workers: int, dim: int, **params: Any) -> ServerRule:
    """Construct server rule `name` for n workers in dimension d; bad parameters: ValueError."""
    return SERVER_RULES.build(name, num_workers=num_workers, dim=dim, **params)
