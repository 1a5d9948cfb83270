"""Incremental coordinate-wise aggregation and the change of ĝ: bit-identical to a full recompute.

A reference engine with both limits negative aggregates every column every round and records no
delta; the engine under test recomputes only the dirty columns where it may (its limits are raised
so that the small test problem takes that path) and records ĝ's change from either path. Both
must agree bit for bit (−0.0 vs +0.0 included) on the aggregate and on x, over many random rounds
with partial participation, zero and signed-zero values, repeated rows and the occasional round
too dense to be done incrementally. A mirror that only ever sees `last_delta` must track x exactly.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from torch import Tensor

from byzps.common._state_kernels import changed_entries
from byzps.common.aggregators import build_aggregator, forced_backend
from byzps.common.downlink import apply_step
from byzps.common.server_rules import build_server_rule
from byzps.common.sparse import SparseBatch
from byzps.server.engine import RoundEngine

N, D, ROUNDS = 7, 300, 40
RULE_PARAMS = {"state": {}, "message": {}, "diana": {"a": 0.5}, "marina": {"p": 0.3}}


def bits(t: Tensor) -> Tensor:
    return t.view(torch.int32)


def engine(
    rule: str, aggregator: str, pre: tuple[str, ...] = (), full: bool = False
) -> RoundEngine:
    """The engine under test (incremental up to |U| = D/2), or the full reference (`full`)."""
    x0 = torch.randn(D, generator=torch.Generator().manual_seed(1))
    limit = -1.0 if full else 0.5
    return RoundEngine(
        x0,
        build_server_rule(rule, N, D, **RULE_PARAMS[rule]),
        build_aggregator(aggregator, f=1 if "bucketing" in pre else 2, pre=pre),  # ⌈N/2⌉ buckets
        lr=0.1,
        delta_limit=limit,
        incremental_limit=limit,
    )


def count_incremental(e: RoundEngine) -> list[int]:
    """A counter of the aggregations `e` does on dirty columns only."""
    calls = [0]
    inner = e.aggregator.aggregate_columns

    def counted(x: Tensor, columns: Tensor) -> Tensor:
        calls[0] += 1
        return inner(x, columns)

    e.aggregator.aggregate_columns = counted  # type: ignore[method-assign]
    return calls


def mirror_check(e: RoundEngine):
    """on_close for play(): a worker-side mirror fed only `last_delta` (dense resync when None)
    must hold e's x bit for bit; returns (check, number of deltas applied)."""
    state = {"x": e.x.clone(), "g": e.last_aggregate.clone(), "deltas": 0}

    def check() -> None:
        delta = e.last_delta
        if delta is None:
            state["x"], state["g"] = e.x.clone(), e.last_aggregate.clone()
            return
        state["deltas"] += 1
        assert delta.round == e.round
        state["g"][delta.indices.long()] = delta.values
        apply_step(state["x"], state["g"], e.lr)
        assert torch.equal(bits(state["x"]), bits(e.x))

    return check, state


def random_batch(gen: torch.Generator, rows: int, k: int) -> SparseBatch:
    return random_batch_of(gen, rows, k, D)


def random_batch_of(gen: torch.Generator, rows: int, k: int, dim: int) -> SparseBatch:
    idx = torch.stack([torch.randperm(dim, generator=gen)[:k].sort().values for _ in range(rows)])
    values = torch.randn(rows, k, generator=gen)
    values[torch.rand(rows, k, generator=gen) < 0.1] = 0.0
    values[torch.rand(rows, k, generator=gen) < 0.05] = -0.0
    return SparseBatch(idx.to(torch.int32), values, dim)


def play(engines: list[RoundEngine], seed: int, on_close=None) -> None:
    """Feed every engine the same random rounds; call on_close() after each round."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(ROUNDS):
        pushers = torch.randperm(N, generator=gen)[
            : int(torch.randint(1, N + 1, (1,), generator=gen))
        ]
        if torch.rand(1, generator=gen) < 0.2:  # a worker pushing twice in one batch
            pushers = torch.cat([pushers, pushers[:1]])
        k = (
            150
            if torch.rand(1, generator=gen) < 0.1
            else int(torch.randint(1, 12, (1,), generator=gen))
        )
        batch = random_batch(gen, len(pushers), k)
        for e in engines:
            e.absorb(pushers, batch)
            e.close_round()
        if on_close is not None:
            on_close()


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("rule", ["state", "message"])
@pytest.mark.parametrize("aggregator", ["mean", "cm", "cwtm", "meamed"])
def test_incremental_is_bit_identical_to_full(aggregator: str, rule: str, backend: str) -> None:
    fast, full = engine(rule, aggregator), engine(rule, aggregator, full=True)
    incremental = count_incremental(fast)
    follow, mirror = mirror_check(fast)

    def check() -> None:
        assert torch.equal(bits(fast.last_aggregate), bits(full.last_aggregate))
        assert torch.equal(bits(fast.x), bits(full.x))
        follow()

    with forced_backend(backend):
        play([fast, full], seed=zlib.crc32(f"{aggregator}/{rule}".encode()), on_close=check)
    assert full.last_delta is None
    assert incremental[0] > ROUNDS // 2  # most rounds really were incremental
    assert mirror["deltas"] > ROUNDS // 2


def test_delta_holds_only_changed_coordinates() -> None:
    e = engine("state", "mean")
    gen = torch.Generator().manual_seed(3)
    e.absorb(torch.arange(N), random_batch(gen, N, 5))
    e.close_round()  # round 0: a full aggregation, its change found by comparison with ĝ = 0
    assert e.last_delta is not None
    assert torch.equal(e.last_delta.indices.long(), e.last_aggregate.nonzero().flatten())
    before = e.last_aggregate.clone()
    e.absorb(torch.tensor([2]), random_batch(gen, 1, 5))
    e.close_round()
    delta = e.last_delta
    assert delta is not None and 0 < delta.indices.numel() <= 5
    changed = (bits(before) != bits(e.last_aggregate)).nonzero().reshape(-1)
    assert torch.equal(changed, delta.indices.long())
    e.close_round()  # nobody pushed: nothing changes
    assert e.last_delta is not None and e.last_delta.indices.numel() == 0


def test_a_change_larger_than_the_limit_is_not_recorded() -> None:
    e = engine("state", "mean")
    e.absorb(torch.arange(N), random_batch(torch.Generator().manual_seed(4), N, D // 2))
    e.close_round()  # ĝ moves on far more than D/2 coordinates
    assert e.last_delta is None


@pytest.mark.parametrize("over", [0, 1])
def test_the_compiled_comparison_finds_every_changed_bit_up_to_its_limit(over: int) -> None:
    """changed_entries compares bits: −0.0 against +0.0 is a change, a NaN kept bit for bit is
    not; it returns exactly numpy's mask positions and values, and refuses one entry over."""
    gen = torch.Generator().manual_seed(6)
    old = torch.randn(100_000, generator=gen)
    old[:3] = torch.tensor([0.0, float("nan"), 1.0])
    new = old.clone()
    new[torch.randperm(100_000, generator=gen)[:16_500]] += 1.0
    new[:3] = torch.tensor([-0.0, float("nan"), 1.0])
    mask = bits(new) != bits(old)
    expected = mask.nonzero().flatten()
    assert expected[0] == 0 and 1 not in expected.tolist()
    fits, indices, values = changed_entries(
        bits(new).numpy(), bits(old).numpy(), len(expected) - over
    )
    assert fits == (over == 0)
    if fits:
        assert torch.equal(torch.from_numpy(indices).long(), expected)
        assert torch.equal(torch.from_numpy(values), bits(new)[expected])


def test_full_aggregations_still_give_exact_deltas() -> None:
    """The default limits with a union too large for the incremental path (20 messages of
    20 % of the columns cover ~99 %, past cm's half): the change of ĝ comes from comparing it
    with its predecessor, and a mirror stays exact."""
    x0 = torch.zeros(20_000)
    e = RoundEngine(x0, build_server_rule("state", 20, 20_000), build_aggregator("cm", 4), 0.1)
    incremental = count_incremental(e)
    follow, mirror = mirror_check(e)
    gen = torch.Generator().manual_seed(9)
    for _ in range(6):
        idx = torch.stack(
            [torch.randperm(20_000, generator=gen)[:4000].sort().values for _ in range(20)]
        )
        e.absorb(
            torch.arange(20),
            SparseBatch(idx.to(torch.int32), torch.randn(20, 4000, generator=gen), 20_000),
        )
        e.close_round()
        follow()
    assert incremental[0] == 0 and mirror["deltas"] == 6


@pytest.mark.parametrize(
    ("rule", "aggregator", "pre"),
    [
        ("state", "cm", ("nnm",)),
        ("state", "cm", ("bucketing",)),
        ("state", "krum", ()),
        ("state", "gm", ()),
        ("message", "cclip", ()),
        ("diana", "mean", ()),
        ("marina", "cm", ()),
    ],
)
def test_incremental_is_off_where_inexact(rule: str, aggregator: str, pre: tuple[str, ...]) -> None:
    """Rules that mix rows, and server rules that change whole rows, always aggregate in full;
    the change of ĝ they record (when small enough) still keeps a mirror exact."""
    fast, full = engine(rule, aggregator, pre), engine(rule, aggregator, pre, full=True)
    incremental = count_incremental(fast)
    follow, _ = mirror_check(fast)

    def check() -> None:
        assert torch.equal(bits(fast.x), bits(full.x))
        follow()

    play([fast, full], seed=5, on_close=check)
    assert incremental[0] == 0


def test_checkpoint_restore_aggregates_in_full_once() -> None:
    e = engine("message", "cm")
    play([e], seed=7)
    restored = engine("message", "cm")
    restored.load_state_dict(e.state_dict())
    assert restored.last_delta is None
    play([e, restored], seed=8)  # message supports unknown after restore: the fallback is exact
    assert torch.equal(bits(e.x), bits(restored.x))
    assert restored.last_delta is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("a", "b", "slide"), [(9, 11, 0), (4, 16, 0), (0, 12, 8)])
def test_a_band_read_at_some_columns_is_the_full_bands_entries(
    dtype: torch.dtype, a: int, b: int, slide: int
) -> None:
    """`ops.band_mean_columns` (the columns read in place, over one chunk or several) gives
    bitwise band_mean(x)[columns]: ties, ±inf, NaN, ±0.0 included; a column outside x is an
    IndexError, not a read past the states."""
    from byzps.common._prefetch import AHEAD
    from byzps.common.aggregators import ops
    from byzps.common.aggregators._kernels import CHUNK

    gen = torch.Generator().manual_seed(a + b + slide)
    d = 3 * CHUNK + 5
    x = torch.randn(20, d, generator=gen, dtype=dtype)
    x[:, ::3] = torch.randint(-2, 3, (20, len(range(0, d, 3))), generator=gen).to(dtype)
    x[0, ::7], x[1, ::11], x[2, ::13], x[3, ::17] = torch.inf, -torch.inf, torch.nan, -0.0
    empty = np.empty((0, 0), np.int64), np.empty((0, 0), np.float64)
    full = ops.band_mean(x, *empty, a, b, slide)
    for count in (0, 1, AHEAD - 1, AHEAD, AHEAD + 1, 500, 2 * CHUNK + 1):
        columns = torch.randperm(d, generator=gen)[:count].sort().values
        if count:  # the last column too: the prefetched reads run up to it (`_prefetch.AHEAD`)
            columns = torch.cat([columns[columns != d - 1], torch.tensor([d - 1])])
        got = ops.band_mean_columns(x, columns, a, b, slide)
        assert got.numpy().tobytes() == full[columns].numpy().tobytes(), count
    with pytest.raises(IndexError):
        ops.band_mean_columns(x, torch.tensor([0, d]), a, b, slide)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_weighted_sum_read_at_some_columns_is_the_full_sums_entries(dtype: torch.dtype) -> None:
    """`ops.combine_columns` (the mean's incremental round, read in place over one chunk or
    several, prefetching `AHEAD` columns on) gives bitwise combine(x, w)[columns]: ±inf, NaN,
    −0.0 and zero weights included, every length around `AHEAD`, up to the last column; a
    column outside x is an IndexError, not a read past the states."""
    from byzps.common._prefetch import AHEAD
    from byzps.common.aggregators import ops
    from byzps.common.aggregators._kernels import CHUNK

    gen = torch.Generator().manual_seed(5)
    d = 3 * CHUNK + 5
    x = torch.randn(20, d, generator=gen, dtype=dtype)
    x[0, ::7], x[1, ::11], x[2, ::13], x[3, ::17] = torch.inf, -torch.inf, torch.nan, -0.0
    for weights in (np.full(20, 1 / 20), np.where(np.arange(20) % 3 == 0, 0.0, 0.25)):
        full = ops.combine(x, weights)
        for count in (0, 1, AHEAD - 1, AHEAD, AHEAD + 1, 500, 2 * CHUNK + 1):
            columns = torch.randperm(d - 1, generator=gen)[: max(0, count - 1)]
            if count:
                columns = torch.cat([columns, torch.tensor([d - 1])])
            columns = columns.sort().values
            got = ops.combine_columns(x, columns, weights)
            assert got.numpy().tobytes() == full[columns].numpy().tobytes(), count
    with pytest.raises(IndexError):
        ops.combine_columns(x, torch.tensor([0, d]), np.full(20, 1 / 20))


def test_a_dense_message_turns_the_union_off_for_its_round() -> None:
    """One message touching more than the limit alone makes the round a full one; the next
    round's union holds only that round's columns."""
    e = RoundEngine(
        torch.zeros(1000), build_server_rule("state", 4, 1000), build_aggregator("cm", 1), 0.1
    )
    incremental = count_incremental(e)
    gen = torch.Generator().manual_seed(4)
    e.absorb(torch.arange(4), random_batch_of(gen, 4, 10, 1000))
    e.close_round()  # the first round is always full
    e.absorb(torch.tensor([0]), random_batch_of(gen, 1, 10, 1000))
    e.absorb(torch.tensor([1]), random_batch_of(gen, 1, 600, 1000))  # > cm's half of d alone
    e.close_round()
    assert incremental[0] == 0
    seen: list[Tensor] = []
    inner = e.aggregator.aggregate_columns
    e.aggregator.aggregate_columns = lambda x, c: (seen.append(c), inner(x, c))[1]  # type: ignore[method-assign]
    batch = random_batch_of(gen, 1, 10, 1000)
    e.absorb(torch.tensor([2]), batch)
    e.close_round()
    assert len(seen) == 1 and torch.equal(seen[0], batch.indices[0].long().sort().values)


def test_marks_a_round_did_not_read_do_not_reach_the_next() -> None:
    """The union is a bitset kept between rounds: marks of a round closed without reading it
    (an aggregation done elsewhere, or one abandoned past the limit) are cleared, never
    carried into the next round's union; an index outside the columns marks nothing."""
    from byzps.server.engine import _DirtyColumns

    dirty = _DirtyColumns(200, 0.5)
    dirty.restart(True)
    dirty.add(torch.tensor([3, 150, 64]))
    dirty.restart(True)  # the round closed without reading its union
    dirty.add(torch.tensor([7, 63, 64]))
    assert dirty.union().tolist() == [7, 63, 64]
    dirty.restart(True)
    dirty.add(torch.tensor([5]))
    dirty.add(torch.arange(150))  # past the limit alone: the round is a full one
    assert dirty.union() is None
    dirty.restart(True)
    with pytest.raises(IndexError):
        dirty.add(torch.tensor([1, 200]))
    dirty.add(torch.tensor([199]))
    assert dirty.union().tolist() == [199]


def test_a_returned_aggregate_holds_until_two_more_closes_and_only_ours_are_reused() -> None:
    """An incremental round writes ĝ over the memory of the ĝ before last: each returned ĝ must
    stay intact through the next close, and a tensor the aggregator returned (a full round's)
    must never be written over, however many incremental rounds follow."""
    e = engine("state", "cm")
    gen = torch.Generator().manual_seed(7)
    returned: list[tuple[Tensor, Tensor, bool]] = []
    incremental = count_incremental(e)
    for t in range(12):
        before = incremental[0]
        e.absorb(torch.arange(N), random_batch(gen, N, 150 if t in (0, 5) else 3))
        g = e.close_round()
        returned.append((g, g.clone(), incremental[0] == before))
        if len(returned) >= 2:
            previous, kept, _ = returned[-2]
            assert torch.equal(bits(previous), bits(kept))
    assert incremental[0] >= 8
    full_outputs = [(g, kept) for g, kept, full in returned if full]
    assert full_outputs, "some round must have aggregated in full"
    for g, kept in full_outputs:
        assert torch.equal(bits(g), bits(kept))
    assert any(not torch.equal(bits(g), bits(kept)) for g, kept, _ in returned[:-2])
