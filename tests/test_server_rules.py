"""Server rules: candidate = base + message for every rule, stale rows for silent workers, the
DIANA and MARINA recursions written out by hand, and state round-trips."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from byzps.common.seeding import uniform
from byzps.common.server_rules import (
    PARALLEL_SCATTER,
    SERVER_RULES,
    SMALL_SCATTER,
    MarinaRule,
    ServerRule,
    build_server_rule,
    full_gradient_round,
    scatter_add_rows,
)
from byzps.common.sparse import INDEX_DTYPE, SparseBatch

N, D, K = 5, 12, 3
PARAMS: dict[str, dict[str, Any]] = {
    "state": {},
    "message": {},
    "diana": {"a": 0.25},
    "marina": {"p": 0.5, "seed": 3},
}


def make_rule(name: str) -> ServerRule:
    return build_server_rule(name, N, D, dtype=torch.float64, **PARAMS[name])


def random_messages(rows: int, seed: int, nnz: int = K) -> SparseBatch:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(D, generator=gen)[:nnz].sort().values for _ in range(rows)])
    values = torch.randn(rows, nnz, generator=gen, dtype=torch.float64)
    return SparseBatch(idx.to(INDEX_DTYPE), values, D)


def drive(rule: ServerRule, rounds: int, seed: int = 0) -> list[torch.Tensor]:
    """A few rounds in which workers 0..N−2 speak and the last one stays silent after round 0."""
    outs = []
    for t in range(rounds):
        rows = torch.arange(N) if t == 0 else torch.arange(N - 1)
        rule.absorb(rows, random_messages(len(rows), seed + t), t)
        aggregate = rule.candidates.mean(dim=0)
        rule.close_round(aggregate, t)
        outs.append(rule.candidates.clone())
    return outs


def test_registry_names() -> None:
    assert {"state", "message", "diana", "marina"} <= set(SERVER_RULES.names())
    with pytest.raises(ValueError, match="server rule"):
        build_server_rule("nope", N, D)
    with pytest.raises(ValueError, match="zeta"):
        build_server_rule("state", N, D, zeta=1)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_candidate_is_base_plus_message(name: str) -> None:
    rule = make_rule(name)
    drive(rule, 3)  # non-trivial bases
    for t in range(3, 7):
        rows = torch.tensor([3, 0, 2])
        msgs = random_messages(3, 100 + t)
        before = rule.candidates.clone()
        bases = rule.bases(rows).clone()
        rule.absorb(rows, msgs, t)
        torch.testing.assert_close(
            rule.candidates[rows], bases + msgs.to_dense(), rtol=0, atol=1e-12
        )
        silent = torch.tensor([1, 4])
        torch.testing.assert_close(rule.candidates[silent], before[silent], rtol=0, atol=0)
        rule.close_round(rule.candidates.mean(0), t)


def test_state_rule_accumulates_exactly_once() -> None:
    rule = make_rule("state")
    g = torch.zeros(N, D, dtype=torch.float64)
    for t in range(4):
        msgs = random_messages(N, t)
        rule.absorb(torch.arange(N), msgs, t)
        g += msgs.to_dense()
        rule.close_round(rule.candidates.mean(0), t)
    torch.testing.assert_close(rule.candidates, g, rtol=0, atol=1e-12)


def test_message_rule_bases_are_zero_and_stale_rows_kept() -> None:
    rule = make_rule("message")
    assert torch.equal(rule.bases(torch.tensor([0, 1])), torch.zeros(2, D, dtype=torch.float64))
    msgs = random_messages(N, 0)
    rule.absorb(torch.arange(N), msgs, 0)
    rule.absorb(torch.tensor([1]), random_messages(1, 9), 1)
    expected = msgs.to_dense()
    expected[1] = random_messages(1, 9).to_dense()[0]
    torch.testing.assert_close(rule.candidates, expected, rtol=0, atol=0)


def test_diana_recursion() -> None:
    a = PARAMS["diana"]["a"]
    rule = make_rule("diana")
    h = torch.zeros(N, D, dtype=torch.float64)
    for t in range(5):
        c = random_messages(N, t).to_dense()
        rule.absorb(torch.arange(N), random_messages(N, t), t)
        torch.testing.assert_close(rule.candidates, h + c, rtol=0, atol=1e-12)
        h = h + a * c
        torch.testing.assert_close(rule.h, h, rtol=0, atol=1e-12)
        torch.testing.assert_close(rule.bases(torch.arange(N)), h, rtol=0, atol=1e-12)
        rule.close_round(rule.candidates.mean(0), t)


def test_marina_recursion() -> None:
    p, seed = PARAMS["marina"]["p"], PARAMS["marina"]["seed"]
    rule = make_rule("marina")
    assert isinstance(rule, MarinaRule)
    previous = None
    kinds = set()
    for t in range(12):
        full = t == 0 or uniform(seed, "marina", t) < p
        assert rule.is_full(t) == full == full_gradient_round(seed, t, p)
        kinds.add(full)
        c = random_messages(N, t).to_dense()
        rule.absorb(torch.arange(N), random_messages(N, t), t)
        expected = c if full else previous + c
        torch.testing.assert_close(rule.candidates, expected, rtol=0, atol=1e-12)
        aggregate = rule.candidates.median(dim=0).values
        rule.close_round(aggregate, t)
        previous = aggregate
        assert rule.round == t + 1
        torch.testing.assert_close(rule.last_aggregate, aggregate, rtol=0, atol=0)
    assert kinds == {True, False}  # both branches exercised


def test_marina_bases_follow_open_round() -> None:
    rule = make_rule("marina")
    assert torch.equal(rule.bases([0, 1]), torch.zeros(2, D, dtype=torch.float64))  # round 0
    t = next(t for t in range(1, 50) if not rule.is_full(t))
    agg = torch.randn(D, dtype=torch.float64)
    rule.close_round(agg, t - 1)
    torch.testing.assert_close(rule.bases([0, 1]), agg.expand(2, D))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_a_late_message_applies_unless_its_marina_coin_has_passed(name: str) -> None:
    """The server absorbs a late message with the round open now; only MARINA, whose base
    depends on the coin, refuses (at the door) one whose round's coin is not the open round's."""
    rule = make_rule(name)
    for t in range(12):
        for claimed in range(t + 1):
            reason = rule.late_refusal(claimed)
            if not isinstance(rule, MarinaRule) or rule.is_full(claimed) == rule.is_full(t):
                assert reason is None
            else:
                assert reason is not None and reason.startswith(f"round {claimed} is a ")
                assert f"round {t}, open now" in reason
        rule.close_round(torch.zeros(D, dtype=torch.float64), t)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_state_round_trip(name: str) -> None:
    rule = make_rule(name)
    drive(rule, 4)
    state = rule.state_dict()
    clone = make_rule(name)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.candidates, rule.candidates, rtol=0, atol=0)
    # the same future on both
    a, b = drive(rule, 3, seed=50), drive(clone, 3, seed=50)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # the state is a copy, not a view of the live tensors
    assert not any(
        isinstance(v, torch.Tensor) and v.data_ptr() == rule.candidates.data_ptr()
        for v in rule.state_dict().values()
    )
    with pytest.raises(ValueError, match="missing"):
        make_rule(name).load_state_dict({})


def test_scatter_add_rows_duplicates_and_dense() -> None:
    target = torch.zeros(3, D, dtype=torch.float64)
    msgs = random_messages(3, 0)
    scatter_add_rows(target, torch.tensor([1, 1, 2]), msgs, alpha=2.0)
    dense = msgs.to_dense()
    expected = torch.zeros(3, D, dtype=torch.float64)
    expected[1] = 2 * (dense[0] + dense[1])
    expected[2] = 2 * dense[2]
    torch.testing.assert_close(target, expected)
    full = random_messages(2, 1, nnz=D)
    scatter_add_rows(target, torch.tensor([0, 0]), full)
    torch.testing.assert_close(target[0], full.values.sum(0))


@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_dense_rows_take_a_path_of_their_own_with_the_flat_scatters_bits(alpha: float) -> None:
    """Dense messages (nnz = d) skip the m·d flat index; the sums keep the same bits, repeated
    rows added in batch order, alpha multiplied first (as the flat index_add_ does)."""
    start = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    full = random_messages(4, 2, nnz=D)
    full = SparseBatch(full.indices, full.values.float(), D)
    rows = torch.tensor([2, 0, 2, 1])
    target = start.clone()
    scatter_add_rows(target, rows, full, alpha=alpha)
    reference = start.clone()
    flat = (rows[:, None] * D + full.indices.long()).reshape(-1)
    reference.view(-1).index_add_(0, flat, full.values.reshape(-1), alpha=alpha)
    assert torch.equal(target, reference)


@pytest.mark.parametrize("k", [2_500, PARALLEL_SCATTER // 4])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [2, 0, 2, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_sparse_batches_keep_the_flat_scatters_bits(
    rows: list[int], dtype: torch.dtype, k: int
) -> None:
    """Above SMALL_SCATTER values a CPU batch goes through a compiled pass (rows split between
    threads when distinct, in batch order when one repeats); every sum has index_add_'s bits."""
    d = 400_000
    gen = torch.Generator().manual_seed(8)
    idx = torch.stack([torch.randperm(d, generator=gen)[:k].sort().values for _ in rows])
    messages = SparseBatch(idx.to(INDEX_DTYPE), torch.randn(len(rows), k, generator=gen), d)
    assert messages.values.numel() > SMALL_SCATTER
    start = torch.randn(4, d, generator=gen, dtype=dtype)
    target = start.clone()
    scatter_add_rows(target, torch.tensor(rows), messages)
    reference = start.clone()
    flat = (torch.tensor(rows)[:, None] * d + idx).reshape(-1)
    reference.view(-1).index_add_(0, flat, messages.values.reshape(-1).to(dtype))
    assert torch.equal(target, reference)


@pytest.mark.parametrize(("row", "index"), [(4, 0), (-1, 0), (0, 400_000), (0, -1)])
def test_the_compiled_scatter_refuses_an_out_of_range_target_and_writes_nothing(
    row: int, index: int
) -> None:
    """Compiled code does not check subscripts, so the scatter checks every row and index first:
    an out-of-range one raises, as index_add_ would, and no state changes."""
    d, k = 400_000, SMALL_SCATTER
    idx = torch.arange(k, dtype=INDEX_DTYPE).repeat(2, 1) * 50
    idx[1, -1] = index if index >= 0 else -1
    messages = SparseBatch(idx, torch.ones(2, k), d)
    target = torch.zeros(4, d)
    with pytest.raises(IndexError, match="outside"):
        scatter_add_rows(target, torch.tensor([2, row]), messages)
    assert not target.any()


@pytest.mark.parametrize("rows", [[3], [1, 3, 1]])
def test_the_door_checks_dense_messages_on_the_whole_row(rows: list[int]) -> None:
    """A dense push whose sum with its sender's state overflows is refused, one row or many."""
    rule = make_rule("state")
    big = torch.full((len(rows), D), 1e308, dtype=torch.float64)
    full = SparseBatch(torch.arange(D, dtype=INDEX_DTYPE).repeat(len(rows), 1), big, D)
    assert bool(rule.admissible(torch.tensor(rows), full, 0).all())  # g = 0: finite
    rule.absorb(torch.tensor([3]), SparseBatch(full.indices[:1], big[:1], D), 0)
    admissible = rule.admissible(torch.tensor(rows), full, 0)
    assert admissible.tolist() == [r != 3 for r in rows]  # row 3 would reach 2e308 = inf


@pytest.mark.parametrize(
    ("name", "params", "word"),
    [("diana", {"a": 0.0}, "a must"), ("marina", {"p": 1.5}, "p must"), ("diana", {}, "'a'")],
)
def test_bad_parameters(name: str, params: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        build_server_rule(name, N, D, **params)


def test_message_dim_and_row_count_checked() -> None:
    rule = make_rule("state")
    with pytest.raises(ValueError, match="rows"):
        rule.absorb(torch.tensor([0]), random_messages(2, 0), 0)
    bad = SparseBatch(torch.zeros(1, 1, dtype=INDEX_DTYPE), torch.ones(1, 1), D + 1)
    with pytest.raises(ValueError, match="dim"):
        rule.absorb(torch.tensor([0]), bad, 0)
