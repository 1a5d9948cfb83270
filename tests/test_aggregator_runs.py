"""Several runs aggregated in one call (`RowsAggregator.aggregate_runs`, aggregators/runs.py) give
each run bitwise what the rule gives it alone, and refuse (NotBatched) what they cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from byzps.common.aggregators import _kernels, build_aggregator, ops
from byzps.common.aggregators._kernels import CHUNK
from byzps.common.aggregators.ops import forced_backend
from byzps.common.aggregators.runs import NotBatched
from byzps.common.aggregators.verdict import Weighted, band_discounts

BATCHED = [("cm", []), ("cwtm", []), ("meamed", []), ("cm", ["nnm"]), ("cwtm", ["nnm"]),
           ("meamed", ["nnm"])]  # fmt: skip


def runs_input(runs: int, n: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """R runs' rows: gaussian, one run with a row 1e3 times larger (still a precise Gram), one
    with small integers (ties in every column), one with ±inf and NaN entries."""
    gen = torch.Generator().manual_seed(runs * n + d)
    x = torch.randn(runs, n, d, generator=gen, dtype=dtype)
    x[1, 2] *= 1e3
    if runs > 2:
        x[2] = torch.randint(-2, 3, (n, d), generator=gen).to(dtype)
    if runs > 3:
        x[3, 0, ::7] = torch.inf
        x[3, 1, ::5] = torch.nan
    return x


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


@pytest.mark.parametrize(("name", "pre"), BATCHED, ids=lambda v: str(v))
@pytest.mark.parametrize(
    ("n", "f", "d", "dtype"),
    [(20, 8, 123, torch.float32), (7, 2, 3 * CHUNK + 5, torch.float32), (9, 3, 64, torch.float64)],
    ids=["a9a-shape", "several-chunks", "float64"],
)
def test_each_run_gets_bitwise_its_own_aggregate_and_verdict(
    name: str, pre: list[str], n: int, f: int, d: int, dtype: torch.dtype
) -> None:
    rule = build_aggregator(name, f, pre=pre, n=n)
    x = runs_input(3 if "nnm" in pre else 4, n, d, dtype)  # nnm: inf rows are not batched
    together, verdicts = rule.aggregate_runs(x)
    discounts = band_discounts(verdicts, x)  # all runs' suspicion discounts in one call
    assert discounts is not None
    for r in range(x.shape[0]):
        alone = rule(x[r].clone())
        assert bits(together[r]) == bits(alone), f"run {r}"
        own = rule.last_verdict
        assert own is not None and verdicts[r] is not None
        expected = own.discount(x[r], None).tobytes()
        assert verdicts[r].discount(x[r], None).tobytes() == expected
        assert discounts[r].tobytes() == expected


@pytest.mark.parametrize("d", [1, 123, 2 * CHUNK + 3])
def test_the_runs_grams_are_each_runs_own_bit_for_bit(d: int) -> None:
    """`ops.centred_grams` (one compiled loop over the runs) gives each run the Gram its own
    `centred_gram` call gives, over one chunk or several, float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        x = runs_input(4, 20, d, dtype)
        grams = ops.centred_grams(x)
        for r in range(x.shape[0]):
            alone = ops.centred_gram(x[r].clone())
            assert grams[r].tobytes() == alone.tobytes(), (r, dtype)


def test_discounts_of_verdicts_that_are_not_one_band_are_left_to_each_verdict() -> None:
    x = runs_input(2, 20, 123)
    _, bands = build_aggregator("cm", 8, n=20).aggregate_runs(x)
    _, other = build_aggregator("cwtm", 8, n=20).aggregate_runs(x)
    weighted = Weighted(np.full(20, 0.05))
    assert band_discounts([bands[0], other[1]], x) is None  # two bands
    assert band_discounts([bands[0], weighted], x) is None


@pytest.mark.parametrize(
    ("why", "rule", "x"),
    [
        # One run's huge row makes its mean-centred Gram imprecise: Rows recentres it on the
        # median, which RunsRows leaves to the one-run path.
        ("median centre", ("cm", ["nnm"]), runs_input(3, 20, 123).index_put_(
            (torch.tensor(1), torch.tensor(0)), torch.tensor(3e38))),
        ("non-finite rows", ("cm", ["nnm"]), runs_input(4, 20, 123)),
        ("not a band", ("gm", ["nnm"]), runs_input(2, 20, 123)),
        ("bucketing's state", ("cm", ["bucketing"]), runs_input(2, 20, 123)),
        ("the mean", ("mean", []), runs_input(2, 20, 123)),
        ("not (R, n, d)", ("cm", []), torch.randn(20, 123)),
    ],
)  # fmt: skip
def test_what_needs_the_one_run_path_is_refused(
    why: str, rule: tuple[str, list[str]], x: torch.Tensor
) -> None:
    name, pre = rule
    with pytest.raises(NotBatched):
        build_aggregator(name, 2, pre=pre, n=x.shape[-2]).aggregate_runs(x)


def test_the_torch_backend_is_left_to_the_one_run_path() -> None:
    with forced_backend("torch"), pytest.raises(NotBatched):
        build_aggregator("cm", 8, n=20).aggregate_runs(runs_input(2, 20, 123))


def test_the_runs_lists_are_each_runs_own_lists_padded() -> None:
    """`runs_lists` (the batch's band lists in one call) is, run by run, `sparse_lists` of its
    mix padded with (0, 0.0) to the longest run's, and `complement_lists` of those padded with
    −1: mixes of equal weights (the complement applies), of unequal ones (it does not), of
    different widths across runs, and with NaN entries."""
    rng = np.random.default_rng(3)
    for trial in range(60):
        runs, n, n0 = int(rng.integers(1, 5)), int(rng.integers(1, 12)), int(rng.integers(1, 12))
        members = rng.random((runs, n, n0)) < rng.uniform(0.2, 1.0)
        members[:, :, 0] |= ~members.any(axis=2)  # every row has a member
        weights = np.where(members, 1.0 / members.sum(axis=2, keepdims=True), 0.0)
        if trial % 3 == 1:
            weights = np.where(members, rng.random((runs, n, n0)), 0.0)
        if trial % 3 == 2:
            weights[0, 0, 0] = np.nan
        mixes = np.ascontiguousarray(weights)
        for complement in (True, False):
            idx, wts, by_complement, exc, rw = _kernels.runs_lists(mixes, n0, complement)
            width = max(_kernels.sparse_lists(mix)[0].shape[1] for mix in mixes)
            assert idx.shape == wts.shape == (runs, n, width)
            most = 1
            for r, mix in enumerate(mixes):
                own_idx, own_wts = _kernels.sparse_lists(mix)
                assert np.array_equal(idx[r, :, : own_idx.shape[1]], own_idx)
                assert np.array_equal(wts[r, :, : own_wts.shape[1]], own_wts, equal_nan=True)
                assert not idx[r, :, own_idx.shape[1] :].any()
                assert not wts[r, :, own_wts.shape[1] :].any()
                ok, own_exc, own_rw = _kernels.complement_lists(idx[r], wts[r], n0)
                assert by_complement[r] == (complement and ok)
                if by_complement[r]:
                    assert np.array_equal(rw[r], own_rw)
                    assert np.array_equal(exc[r, :, : own_exc.shape[1]], own_exc)
                    assert (exc[r, :, own_exc.shape[1] :] == -1).all()
                    most = max(most, own_exc.shape[1])
                else:
                    assert (exc[r] == -1).all() and not rw[r].any()
            assert exc.shape == (runs, n, most)
