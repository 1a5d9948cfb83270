"""The compressors of issue 13 — QSGD, natural compression, scaled sign, Perm-K — and the value
cast of the sparsifiers: unbiasedness and the declared ω or α checked empirically (with the exact
variance where one exists, so a wrong constant fails), determinism by seed, and bad parameters."""

from __future__ import annotations

import math

import pytest
import torch

from byzps.common.compressors import (
    COMPRESSORS,
    QSGD,
    Natural,
    NaturalDithering,
    PermK,
    RandK,
    ScaledSign,
    TopK,
    build_compressor,
    permk_block,
)
from byzps.common.compressors.base import FLOAT16_MAX
from byzps.common.seeding import derive_seed

DRAWS = 4000


def sample(comp: object, z: torch.Tensor, workers: list[int] | None = None) -> torch.Tensor:
    """(DRAWS, d) float64 dense compressions of the one row z, each with its own seed."""
    rows = z.expand(DRAWS, -1).clone()
    batch = comp.compress(rows, list(range(DRAWS)), workers)  # type: ignore[attr-defined]
    return batch.to_dense().to(torch.float64)


def assert_moments(draws: torch.Tensor, z: torch.Tensor, var: torch.Tensor) -> None:
    """Unbiased: the sample mean lies within 5 standard errors of z on every coordinate, given
    the exact per-coordinate variance `var`; and the mean squared error matches Σ var to 8 %
    (so a wrong variance, hence a wrong ω, fails)."""
    se = (var / draws.shape[0]).sqrt()
    assert bool(((draws.mean(dim=0) - z[0]).abs() <= 5 * se + 1e-12).all())
    mse = float(((draws - z) ** 2).sum(dim=1).mean())
    assert mse == pytest.approx(float(var.sum()), rel=0.08)


def test_registered_with_their_kind() -> None:
    names = ("qsgd", "natural", "natural-dithering", "permk", "sign")
    kinds = {n: COMPRESSORS.get(n).unbiased for n in names}
    assert kinds == {n: n != "sign" for n in names}


@pytest.mark.parametrize("levels", [1, 2, 7])
def test_qsgd_unbiased_with_its_exact_variance_within_omega(levels: int) -> None:
    d = 30
    z = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(levels))
    comp = QSGD(d, levels=levels)
    # exact variance (‖z‖/s)² p(1 − p), p the fractional part of s|z_j|/‖z‖
    norm = float(torch.tensor(z.norm().item(), dtype=torch.float32))
    r = z.abs()[0] / norm * levels
    p = r - r.floor()
    var = (norm / levels) ** 2 * p * (1 - p)
    assert_moments(sample(comp, z), z, var)
    assert float(var.sum()) <= comp.omega * float(z.norm() ** 2)
    assert comp.omega == min(d / levels**2, math.sqrt(d) / levels)


def test_qsgd_values_are_scale_times_levels() -> None:
    comp = QSGD(50, levels=3)
    z = torch.randn(4, 50)
    batch = comp.compress(z, [1, 2, 3, 4])
    assert batch.scales is not None and batch.nnz == 50
    torch.testing.assert_close(batch.scales, z.double().norm(dim=1).float())
    levels = batch.values / batch.scales[:, None] * 3
    torch.testing.assert_close(levels, levels.round())
    assert bool((levels.abs() <= 3).all())
    assert not bool(torch.signbit(batch.values[levels == 0]).any())  # no −0.0
    assert torch.equal(batch.values, comp.compress(z, [1, 2, 3, 4]).values)  # seeded
    assert not torch.equal(batch.values, comp.compress(z, [5, 2, 3, 4]).values)


def test_natural_unbiased_and_omega_attained() -> None:
    # |z_j| = 4/3 · 2^e maximises the relative variance: exactly 1/8 of z_j² each
    d = 24
    gen = torch.Generator().manual_seed(5)
    exps = torch.randint(-20, 20, (1, d), generator=gen).to(torch.float64)
    signs = torch.where(torch.rand(1, d, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    z = signs * (4.0 / 3.0) * torch.exp2(exps)
    comp = Natural(d)
    draws = sample(comp, z)
    assert_moments(draws, z, comp.omega * z[0] ** 2)
    assert comp.omega == 1 / 8
    # every value is ±2^e
    m, _ = torch.frexp(draws[draws != 0])
    assert bool((m.abs() == 0.5).all())


@pytest.mark.parametrize("levels", [1, 3, 12])
def test_natural_dithering_unbiased_with_its_exact_variance_within_omega(levels: int) -> None:
    d = 30
    z = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(levels))
    z[0, :5] *= 1e-3  # some coordinates below the smallest grid point 2^(1 − s)
    comp = NaturalDithering(d, levels=levels)
    draws = sample(comp, z)
    # exact variance ‖z‖² (b − r)(r − a) for r = |z_j|/‖z‖ between grid points a ≤ r ≤ b
    norm = float(torch.tensor(z.norm().item(), dtype=torch.float32))
    r = z.abs()[0] / norm
    tiny = 2.0 ** (1 - levels)
    low = torch.where(r < tiny, 0.0, torch.exp2(torch.floor(torch.log2(r.clamp(min=tiny)))))
    high = torch.where(r < tiny, tiny, 2 * low)
    var = norm**2 * (high - r) * (r - low)
    assert_moments(draws, z, var)
    assert float(var.sum()) <= comp.omega * float(z.norm() ** 2)
    assert comp.omega == 1 / 8 + tiny * math.sqrt(d) * min(1.0, math.sqrt(d) * tiny)
    # every value is 0 or ±‖z‖ 2^(l − s)
    ratio = draws.abs() / norm
    assert bool(((ratio == 0) | (torch.frexp(ratio)[0] == 0.5)).all())


def test_natural_edges_saturate_and_round_tiny_values() -> None:
    comp = Natural(3)
    z = torch.tensor([[3.3e38, -1e-40, 0.0]])
    for seed in range(20):
        v = comp.compress(z, [seed]).values[0]
        assert bool(torch.isfinite(v).all())
        assert float(v[0]) in (2.0**127,) and float(v[2]) == 0.0
        assert float(v[1]) in (0.0, -(2.0**-126))


@pytest.mark.parametrize("d", [1, 7, 64])
def test_sign_contracts_by_its_own_alpha_and_at_least_one_over_d(d: int) -> None:
    comp = ScaledSign(d)
    z = torch.randn(200, d, dtype=torch.float64)
    z[0] = 0.0
    z[1] = torch.zeros(d, dtype=torch.float64).index_fill_(0, torch.tensor([0]), 3.0)
    c = comp.compress(z).to_dense().to(torch.float64)
    err = ((c - z) ** 2).sum(dim=1)
    sq = (z**2).sum(dim=1)
    alpha_z = z.abs().sum(dim=1) ** 2 / (d * sq.clamp(min=1e-300))
    torch.testing.assert_close(err, (1 - alpha_z) * sq, rtol=1e-6, atol=1e-9)
    assert bool((alpha_z[sq > 0] >= 1 / d - 1e-12).all()) and comp.alpha == 1 / d
    assert math.isclose(float(err[1]), (1 - 1 / d) * float(sq[1]), rel_tol=1e-6)  # worst case
    assert not comp.unbiased and not comp.seeded


@pytest.mark.parametrize(("d", "n"), [(12, 4), (13, 4), (5, 8)])
def test_permk_unbiased_with_omega_exact(d: int, n: int) -> None:
    comp = PermK(d, num_workers=n)
    z = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    k = -(-d // n)
    assert comp.k == k and comp.omega == d / k - 1
    assert_moments(sample(comp, z, [1] * DRAWS), z, comp.omega * z[0] ** 2)


def test_permk_blocks_partition_and_average_to_z() -> None:
    d, n = 12, 4
    comp = PermK(d, num_workers=n)
    seeds = comp.row_seeds(7, range(n), 3)
    assert len(set(seeds)) == 1 and seeds[0] == derive_seed(7, "permk", 3)
    z = torch.randn(1, d).expand(n, d)
    batch = comp.compress(z, seeds, list(range(n)))
    assert sorted(batch.indices.reshape(-1).tolist()) == list(range(d))
    torch.testing.assert_close(batch.to_dense().mean(dim=0), z[0])
    for w in range(n):
        assert torch.equal(batch.indices[w], permk_block(d, n, seeds[0], w))
    with pytest.raises(ValueError, match="workers"):
        comp.compress(z, seeds)


def test_value_cast_rounds_saturates_and_is_what_is_sent() -> None:
    z = torch.tensor([[1e6, -1e6, 0.1, 3.0, -70000.0]])
    half = TopK(5, k=5, values="float16").compress(z).values
    assert half.dtype == torch.float32
    assert half[0].tolist()[:2] == [FLOAT16_MAX, -FLOAT16_MAX] and half[0, 4] == -FLOAT16_MAX
    assert torch.equal(half, half.to(torch.float16).to(torch.float32))
    bf = RandK(5, k=5, values="bfloat16").compress(z, [1]).values
    assert torch.equal(bf, bf.to(torch.bfloat16).to(torch.float32))
    assert bool(((bf - z).abs() <= z.abs() * 2.0**-8).all())
    assert torch.equal(TopK(5, k=5).compress(z).values, z)


@pytest.mark.parametrize(
    ("name", "params", "word"),
    [
        ("qsgd", {"levels": 0}, "levels"),
        ("qsgd", {"levels": 2.0}, "levels"),
        ("qsgd", {"levels": 70000}, "levels"),
        ("natural-dithering", {"levels": 65}, "levels"),
        ("qsgd", {"values": "float16"}, "values"),  # a quantizer has its own value code
        ("sign", {"values": "bfloat16"}, "values"),
        ("topk", {"k": 1, "values": "float8"}, "values"),
        ("permk", {"values": "int8"}, "values"),
    ],
)
def test_bad_parameters_name_the_parameter(name: str, params: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        build_compressor(name, 10, **params)
    with pytest.raises(ValueError, match="num_workers"):
        PermK(10, num_workers=0)


def test_seeded_quantizers_need_seeds_and_overflowing_scales_fail_loudly() -> None:
    with pytest.raises(ValueError, match="seeds"):
        QSGD(4).compress(torch.randn(2, 4), [1])
    with pytest.raises(ValueError, match="float32"):
        QSGD(4).compress(torch.full((1, 4), 3e38), [1])
    assert build_compressor("permk", 10, num_workers=5).k == 2
    assert build_compressor("qsgd", 10, num_workers=5, levels=3).levels == 3
