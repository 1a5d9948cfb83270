"""nnm's mixing by complement (`ops.complement`, `_kernels.band_mean_complement`): each mixed
row as  w · (Σ all inputs − Σ its excluded ones)  instead of  Σ w · (its members).

The complement is only taken in columns where `_kernels.exact_sums` proves every subset sum of
float32 values exact in float64; there a row is  fl32(fl64(w · Σ members))  with Σ members exact.
Elsewhere (±inf, NaN, 3e38 next to 1, +1e38/−1e38 pairs) the row is mixed member by member, bit
for bit as before. These tests hold the fast path to that: against an exact (math.fsum)
reference, against the member-by-member kernel, and under Byzantine values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from byzps.common.aggregators import _kernels, build_aggregator, forced_backend, ops
from byzps.common.aggregators.rows import Rows

NO_COMPLEMENT = (np.empty((0, 0), np.int64), np.empty(0))


def nnm_mix(x: torch.Tensor, f: int) -> np.ndarray:
    return build_aggregator("cm", f, pre=["nnm"]).mixing(Rows(x), f)


def ranks(x: np.ndarray, idx, wts, exc=None, rw=None) -> np.ndarray:
    """(n, d): every order statistic of the mixed rows, one band (r, r+1) at a time, through the
    member-by-member kernel or (exc given) the complement kernel."""
    n, d = idx.shape[0], x.shape[1]
    block = _kernels.block_size(n, x.itemsize)
    out = np.empty((n, d), x.dtype)
    for r in range(n):
        network = ops.window_network(n, r, r + 1, 0)
        if exc is None:
            _kernels.band_mean(x, idx, wts, network, r, r + 1, 0, block, out[r])
        else:
            _kernels.band_mean_complement(x, idx, wts, exc, rw, network, r, r + 1, 0, block, out[r])
    return out


def exact_reference(x: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """(n, d) sorted fl32(fl64(w_i · Σ members)), the member sums exact (math.fsum)."""
    rows = np.empty((mix.shape[0], x.shape[1]), np.float32)
    for i, weights in enumerate(mix):
        members = np.flatnonzero(weights)
        for t in range(x.shape[1]):
            total = math.fsum(float(v) for v in x[members, t])
            rows[i, t] = np.float32(total * weights[members[0]])
    return np.sort(rows, axis=0)


def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make band_mean (and the verdict) mix member by member, as before the complement."""
    monkeypatch.setattr(ops, "complement", lambda *args: NO_COMPLEMENT)


# --------------------------------------------------------------------------------- when it is used


def test_nnm_mixes_by_complement_and_other_mixes_do_not() -> None:
    x = torch.randn(20, 50)
    exc, rw = ops.complement(x, *ops.sparse_mix(nnm_mix(x, 4)))
    assert exc.shape == (20, 4) and np.all(rw == 1 / 16)
    assert np.all(np.diff(exc, axis=1) > 0)  # ascending, no padding: every row excludes 4
    # float64 inputs (the exactness proof is float32's), a bucketing mix (2 members a row: the
    # lists are cheaper), unequal weights within a row, and nnm with f near n/2 (as many
    # excluded as kept) keep the member lists.
    mix = nnm_mix(x, 4)
    assert ops.complement(x.double(), *ops.sparse_mix(mix))[0].shape[0] == 0
    buckets = np.kron(np.eye(10), np.full((1, 2), 0.5))
    assert ops.complement(x, *ops.sparse_mix(buckets))[0].shape[0] == 0
    uneven = mix.copy()
    uneven[0, np.flatnonzero(uneven[0])[:2]] = [0.5 / 16, 1.5 / 16]
    assert ops.complement(x, *ops.sparse_mix(uneven))[0].shape[0] == 0
    assert ops.complement(x, *ops.sparse_mix(nnm_mix(x, 9)))[0].shape[0] == 0


@pytest.mark.parametrize(
    "value",
    [math.inf, -math.inf, math.nan, 3e38, 1e-30],
    ids=["inf", "-inf", "nan", "3e38", "tiny"],
)
def test_exactness_is_refused_where_a_value_is_non_finite_or_out_of_scale(value: float) -> None:
    x = np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32)
    x[3, ::2] = value
    got = ops.exact_columns(torch.from_numpy(x)).numpy()
    assert not got[::2].any() and got[1::2].all()
    total, big, small, exact = np.empty(64), np.empty(128), np.empty(128), np.empty(64, np.bool_)
    assert not _kernels.exact_sums(x, 0, 64, total, big, small, exact)
    np.testing.assert_array_equal(exact, got)


def test_exact_columns_have_exact_subset_sums() -> None:
    """The proof's claim, checked: at the edge of the allowed spread (n0 · max = 2²⁹ · min), with
    mantissas full of bits, every prefix of every permutation sums exactly in float64."""
    rng = np.random.default_rng(1)
    n0 = 32
    x = (1 + rng.random((n0, 400))).astype(np.float32) * rng.choice([-1, 1], (n0, 400))
    x[0] = np.float32(2.0**29 / n0)  # the largest magnitude the bound allows next to ~1
    x[1] = np.nextafter(np.float32(1.0), np.float32(2.0))
    exact = ops.exact_columns(torch.from_numpy(x)).numpy()
    assert exact.all()
    for t in range(0, 400, 7):
        column = x[rng.permutation(n0), t].astype(np.float64)
        partial = np.cumsum(column)
        assert all(partial[k] == math.fsum(column[: k + 1]) for k in range(n0))


def test_subnormal_columns_are_exact_within_the_same_bound() -> None:
    """Subnormal float32 values are multiples of 2⁻¹⁴⁹ = their ulp: the bound still proves
    their subset sums exact, and refuses them next to normal values far above."""
    rng = np.random.default_rng(2)
    n0 = 16
    tiny = (rng.integers(1, 2**20, (n0, 300)) * rng.choice([-1, 1], (n0, 300))).astype(np.float64)
    x = (tiny * 2.0**-149).astype(np.float32)  # subnormal, exact
    assert np.all(np.abs(x) < np.finfo(np.float32).tiny)
    exact = ops.exact_columns(torch.from_numpy(x)).numpy()
    for t in np.flatnonzero(exact):
        column = x[:, t].astype(np.float64)
        assert np.all(np.cumsum(column) == [math.fsum(column[: k + 1]) for k in range(n0)])
    x[5] = 1.0
    assert not ops.exact_columns(torch.from_numpy(x)).numpy().any()


# ------------------------------------------------------------------------ honest-sized inputs


@pytest.mark.parametrize(("n", "f"), [(21, 4), (15, 3)])
def test_the_complement_is_the_exact_sum_rounded_once(n: int, f: int) -> None:
    """On honest-sized rows every column is exact, and every mixed row equals fl32(w · Σ
    members) with the sum exact — bit for bit. The member-by-member kernel rounds each of its
    n − f terms in float64, so it may differ from that in float32's last place: within one ulp
    (two results within float64 rounding of the same value, each rounded to float32)."""
    x = torch.randn(n, 3000, generator=torch.Generator().manual_seed(n))
    mix = nnm_mix(x, f)
    idx, wts = ops.sparse_mix(mix)
    exc, rw = ops.complement(x, idx, wts)
    assert exc.shape[0] == n
    data = x.numpy()
    assert ops.exact_columns(x).all()
    fast = ranks(data, idx, wts, exc, rw)
    np.testing.assert_array_equal(fast, exact_reference(data, mix))
    slow = ranks(data, idx, wts)
    ulp = np.spacing(np.abs(fast))
    assert np.all(np.abs(slow - fast) <= ulp)
    assert np.mean(slow != fast) < 0.05  # mostly the same bits anyway


@pytest.mark.parametrize("rule", ["cm", "cwtm", "meamed"])
def test_nnm_rules_agree_with_the_member_by_member_mixing(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole rules: a band of order statistics moves no more than the values do, so the
    outputs agree to float32's last place (the mean of a band: to a few ulps of its largest
    term)."""
    x = torch.randn(40, 20000, generator=torch.Generator().manual_seed(2))
    fast = build_aggregator(rule, 6, pre=["nnm"])(x)
    direct(monkeypatch)
    slow = build_aggregator(rule, 6, pre=["nnm"])(x)
    scale = float(x.abs().max())
    torch.testing.assert_close(fast, slow, rtol=2.0**-22, atol=2.0**-22 * scale)


# ------------------------------------------------------------------------ Byzantine inputs


POISONS = {
    "inf": (math.inf, math.inf),
    "-inf": (-math.inf, -math.inf),
    "nan": (math.nan, math.nan),
    "flt_max": (3.4e38, 3.4e38),  # many of them: float32 sums would overflow, float64 ones not
    "cancelling": (1e38, -1e38),
    "huge": (3e38, -3e38),
}


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("rule", ["cm", "cwtm", "meamed"])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_byzantine_columns_are_mixed_exactly_as_before(
    rule: str, poison: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f rows hold ±inf, NaN, FLT_MAX or cancelling pairs in every third column: there the
    output is bit for bit the member-by-member one (the complement would lose the honest values
    to cancellation, so it is not used); elsewhere it agrees to float32 rounding."""
    n, f, d = 21, 5, 3000
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    high, low = POISONS[poison]
    x[0:f:2, ::3] = high
    x[1:f:2, ::3] = low
    poisoned = np.zeros(d, np.bool_)
    poisoned[::3] = True
    assert not ops.exact_columns(x).numpy()[poisoned].any()
    with forced_backend(backend):
        fast = build_aggregator(rule, f, pre=["nnm"])(x).numpy()
        with monkeypatch.context() as patch:
            direct(patch)
            slow = build_aggregator(rule, f, pre=["nnm"])(x).numpy()
    np.testing.assert_array_equal(fast[poisoned].view(np.int32), slow[poisoned].view(np.int32))
    scale = float(x[:, ~torch.from_numpy(poisoned)].abs().max())
    np.testing.assert_allclose(
        fast[~poisoned], slow[~poisoned], rtol=2.0**-22, atol=2.0**-22 * scale
    )


@pytest.mark.parametrize("poison", POISONS)
def test_rows_poisoned_everywhere_take_the_old_path_entirely(
    poison: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, f = 25, 6
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(4))
    high, low = POISONS[poison]
    x[0:f:2] = high
    x[1:f:2] = low
    fast = build_aggregator("cm", f, pre=["nnm"])(x)
    direct(monkeypatch)
    slow = build_aggregator("cm", f, pre=["nnm"])(x)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


def test_a_few_inexact_columns_are_mixed_one_by_one_with_the_same_bits() -> None:
    """`_mix_inexact` mixes few inexact columns column by column and many whole rows at once:
    the same sums in the same order, so the same bits as the list kernel there."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((21, 4096)).astype(np.float32)
    x[2, rng.choice(4096, 40, replace=False)] = 1e30  # sparse: column by column
    x[3, 2048:] = np.inf  # dense: whole rows
    mix = nnm_mix(torch.from_numpy(x), 4)
    idx, wts = ops.sparse_mix(mix)
    exc, rw = ops.complement(torch.from_numpy(x), idx, wts)
    inexact = ~ops.exact_columns(torch.from_numpy(x)).numpy()
    fast = ranks(x, idx, wts, exc, rw)
    slow = ranks(x, idx, wts)
    np.testing.assert_array_equal(fast[:, inexact].view(np.int32), slow[:, inexact].view(np.int32))


# ------------------------------------------------------------------------ backends, twins, verdicts


@pytest.mark.parametrize("d", [5, 700, 40000])
def test_the_serial_twin_and_the_torch_path_give_the_same_bits(d: int) -> None:
    rng = np.random.default_rng(d)
    x = rng.standard_normal((17, d)).astype(np.float32)
    special = rng.random((17, d))
    x[special < 0.01] = np.nan
    x[(special >= 0.01) & (special < 0.02)] = np.inf
    x[(special >= 0.02) & (special < 0.03)] = 1e35
    x[(special >= 0.03) & (special < 0.05)] = -0.0
    tx = torch.from_numpy(x)
    idx, wts = ops.sparse_mix(nnm_mix(tx, 3))
    exc, rw = ops.complement(tx, idx, wts)
    assert exc.shape[0] == 17
    outs = []
    for a, b, slide in [(8, 9, 0), (3, 14, 0), (0, 14, 3)]:
        network = ops.window_network(17, a, b, slide)
        block = _kernels.block_size(17, 4)
        for kernel in (_kernels.band_mean_complement, _kernels.band_mean_complement_serial):
            out = np.empty(d, np.float32)
            kernel(x, idx, wts, exc, rw, network, a, b, slide, block, out)
            outs.append(out)
        with forced_backend("torch"):
            outs.append(ops.band_mean(tx, idx, wts, a, b, slide).numpy())
        assert outs[-3].tobytes() == outs[-2].tobytes() == outs[-1].tobytes(), (a, b, slide)


@pytest.mark.parametrize("rule", ["cm", "cwtm", "meamed"])
def test_the_verdict_is_the_same_band_over_the_same_inputs(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path records the same Banded verdict (the same mix and band), and its discount
    (which mixes the sampled columns member by member, whichever path the output took) is the
    one the member-by-member path gives."""
    x = torch.randn(20, 2000, generator=torch.Generator().manual_seed(6))
    x[:4] += 3.0
    x[:4, ::5] = math.inf
    agg = build_aggregator(rule, 4, pre=["nnm"])
    agg(x)
    verdict = agg.last_verdict
    direct(monkeypatch)
    before = build_aggregator(rule, 4, pre=["nnm"])
    before(x)
    old = before.last_verdict
    assert type(verdict) is type(old)
    np.testing.assert_array_equal(verdict.mix, old.mix)
    assert (verdict.a, verdict.b, verdict.slide) == (old.a, old.b, old.slide)
    np.testing.assert_array_equal(verdict.discount(x, None), old.discount(x, None))


@pytest.mark.parametrize("d", [300, 40000])
def test_computed_mixed_rows_are_the_rows_band_mean_sorts(d: int) -> None:
    """`ops.mix_rows` (the rows `Rows` computes when lazy mixing would cancel) takes the same
    complement: its rows, sorted, are band_mean's order statistics; in inexact columns they are
    `combine`'s sums bit for bit; and the torch path gives the same bits."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((21, d)).astype(np.float32)
    x[0, ::4] = 1e38
    x[1, ::4] = -1e38
    x[2, 1::4] = np.nan
    tx = torch.from_numpy(x)
    mix = nnm_mix(tx, 4)
    idx, wts = ops.sparse_mix(mix)
    exc, rw = ops.complement(tx, idx, wts)
    assert exc.shape[0] == 21
    rows = ops.mix_rows(tx, mix).numpy()
    with forced_backend("torch"):
        assert ops.mix_rows(tx, mix).numpy().tobytes() == rows.tobytes()
    sorted_rows = np.sort(np.where(np.isnan(rows), np.inf, rows), axis=0)
    np.testing.assert_array_equal(sorted_rows, ranks(x, idx, wts, exc, rw))
    inexact = ~ops.exact_columns(tx).numpy()
    assert inexact[::4].all() and inexact[1::4].all() and not inexact[2::4].any()
    for i in range(21):
        summed = ops.combine(tx, mix[i]).numpy()
        np.testing.assert_array_equal(
            rows[i, inexact].view(np.int32), summed[inexact].view(np.int32)
        )


def numpy_sparse_mix(mix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ops.sparse_mix` as it was written in numpy, before `_kernels.sparse_lists`."""
    nonzero = mix != 0.0
    width = int(nonzero.sum(axis=1).max())
    idx = np.argsort(~nonzero, axis=1, kind="stable")[:, :width]
    wts = np.take_along_axis(mix, idx, axis=1)
    padding = ~np.take_along_axis(nonzero, idx, axis=1)
    idx[padding] = 0
    wts[padding] = 0.0
    return idx.astype(np.int64), wts


def numpy_complement(n0: int, idx: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ops.complement` as it was written in numpy, before `_kernels.complement_lists`."""
    nonzero = wts != 0.0
    members = nonzero.sum(axis=1)
    rw = wts[:, 0]
    if not np.all(np.where(nonzero, wts == rw[:, None], True)):
        return NO_COMPLEMENT
    excluded = n0 - members
    if 3 * n0 + excluded.sum() >= members.sum():
        return NO_COMPLEMENT
    inside = np.zeros((idx.shape[0], n0), np.bool_)
    rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
    inside[rows[nonzero], idx[nonzero]] = True
    width = max(1, int(excluded.max()))
    exc = np.argsort(inside, axis=1, kind="stable")[:, :width]
    exc[np.arange(width)[None, :] >= excluded[:, None]] = -1
    return exc, rw


def random_mixes(seed: int) -> list[np.ndarray]:
    """nnm-like mixes (equal weights, a few excluded), bucketing-like ones, unequal and NaN
    weights, and empty rows' neighbours: what the lists must reproduce."""
    gen = np.random.default_rng(seed)
    mixes = []
    for n0 in (3, 8, 20, 41):
        for excluded in range(0, n0 // 2 + 1, max(1, n0 // 6)):
            mix = np.zeros((n0, n0))
            for i in range(n0):
                members = gen.permutation(n0)[: n0 - excluded]
                mix[i, members] = 1.0 / (n0 - excluded)
            mixes.append(mix)
        unequal = mixes[-1].copy()
        unequal[0, np.flatnonzero(unequal[0])[0]] *= 2.0
        poisoned = mixes[-1].copy()
        poisoned[n0 - 1, np.flatnonzero(poisoned[n0 - 1])[-1]] = np.nan
        buckets = np.kron(np.eye(n0 // 2 or 1), np.full((1, 2), 0.5))[:, :n0]
        mixes += [unequal, poisoned, buckets, gen.random((5, n0)) * (gen.random((5, n0)) < 0.3)]
    return mixes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_compiled_lists_are_the_numpy_lists(seed: int) -> None:
    for mix in random_mixes(seed):
        if not (mix != 0.0).any(axis=1).all():
            continue  # a mix row always has members
        idx, wts = ops.sparse_mix(mix)
        want_idx, want_wts = numpy_sparse_mix(mix)
        assert np.array_equal(idx, want_idx) and idx.dtype == np.int64
        assert np.array_equal(wts, want_wts, equal_nan=True)
        x = torch.zeros(mix.shape[1], 4)
        exc, rw = ops.complement(x, idx, wts)
        want_exc, want_rw = numpy_complement(mix.shape[1], want_idx, want_wts)
        assert np.array_equal(exc, want_exc) and exc.dtype == np.int64
        assert np.array_equal(rw, want_rw)
