"""Compressors: Top-k against brute force (all three implementations), Rand-k unbiasedness and
seed regeneration, identity, contractivity, and parameter validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from byzps.common.compressors import (
    COMPRESSORS,
    SMALL_DIM,
    Identity,
    RandK,
    TopK,
    build_compressor,
    is_permk_block,
    permk_block,
    randk_indices,
    topk_indices,
)
from byzps.common.compressors._feistel import keyed_permutation_at
from byzps.common.compressors._permutation import randperm_head
from byzps.common.compressors._topk_scan import SAMPLE, scan_row
from byzps.common.compressors.sparsifiers import SHUFFLED_DIM
from byzps.common.sparse import INDEX_DTYPE

METHODS = ("scan", "numpy", "select", "sort", "torch")


def brute_topk(z: np.ndarray, k: int) -> np.ndarray:
    """Stable argsort of −|z|: equal magnitudes keep index order, so the lower index wins."""
    order = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1)


def tied_input(w: int, d: int, seed: int) -> torch.Tensor:
    """Small integers with random signs: many exact ties in |z|."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (w, d), generator=gen).float()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("w", "d", "k"), [(1, 10, 3), (3, 50, 7), (4, 6000, 60), (2, 9, 9)])
def test_topk_matches_brute_force(method: str, w: int, d: int, k: int) -> None:
    for seed, z in enumerate([torch.randn(w, d), tied_input(w, d, 3)]):
        got = topk_indices(z, k, method)
        assert got.dtype == INDEX_DTYPE and got.shape == (w, k), seed
        np.testing.assert_array_equal(got.numpy(), brute_topk(z.numpy(), k))


def test_topk_tie_rule_lower_index_wins() -> None:
    z = torch.tensor([[1.0, -3.0, 2.0, -2.0, 2.0, 3.0, 0.0]])
    for method in METHODS:
        # |z| = 3, 3, 2, 2, 2: k = 3 keeps both 3s and the first 2 (index 2).
        assert topk_indices(z, 3, method).tolist() == [[1, 2, 5]], method
        assert topk_indices(z, 4, method).tolist() == [[1, 2, 3, 5]], method


def test_topk_all_equal_magnitudes_picks_prefix() -> None:
    z = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0] * 1000])
    for method in METHODS:
        assert topk_indices(z, 7, method).tolist() == [list(range(7))], method


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(1, 4),
    d=st.integers(1, 40),
    data=st.data(),
)
def test_topk_paths_agree(w: int, d: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, d))
    values = data.draw(
        st.lists(
            st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]), min_size=w * d, max_size=w * d
        )
    )
    z = torch.tensor(values).reshape(w, d)
    reference = brute_topk(z.numpy(), k)
    for method in METHODS:
        np.testing.assert_array_equal(topk_indices(z, k, method).numpy(), reference)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_topk_select_keeps_the_sorts_choice_on_non_finite_rows(k: int, bad: float) -> None:
    """The batched select path ("auto" on CPU for small d) ranks NaN below every number and
    ±inf above, exactly as the stable sort of −|z| does, also in float64 and bfloat16."""
    z = torch.tensor([[1.0, bad, -3.0, 3.0, bad, 0.5], [2.0, -2.0, 0.0, 2.0, 1.0, -0.0]])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        zz = z.to(dtype)
        expected = topk_indices(zz, k, "sort")
        assert torch.equal(topk_indices(zz, k, "select"), expected), dtype
        assert torch.equal(topk_indices(zz, k), expected), dtype


def test_topk_compress_values_unscaled_and_sorted() -> None:
    z = torch.randn(3, 5000, dtype=torch.float64)
    batch = TopK(5000, k=50).compress(z)
    batch.validate()
    assert batch.values.dtype == torch.float64 and batch.seeds is None
    torch.testing.assert_close(
        batch.values, torch.gather(z, 1, batch.indices.long()), rtol=0, atol=0
    )
    dense = batch.to_dense()
    kept = dense != 0
    assert int(kept.sum()) == 150
    # every kept magnitude ≥ every dropped one, per row
    for r in range(3):
        assert z[r][kept[r]].abs().min() >= z[r][~kept[r]].abs().max()


def test_topk_ratio_and_large_auto_path() -> None:
    d = 2 * SMALL_DIM + 3
    comp = TopK(d, ratio=0.01)
    assert comp.k == math.floor(0.01 * d)
    z = torch.randn(2, d)
    np.testing.assert_array_equal(comp.indices(z).numpy(), brute_topk(z.numpy(), comp.k))
    assert TopK(10, ratio=0.01).k == 1  # max(1, ⌊ratio·d⌋)


#: A row the scan samples every 7th entry of.
SCAN_DIM = 7 * SAMPLE + 3


def scan_cases(d: int = SCAN_DIM) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) pairs for Top-k of a − b: plain, tied, and rows built to mislead the scan's
    strided sample (every 7th entry at SCAN_DIM) — the large entries between its samples, every
    magnitude equal, mostly zeros."""
    gen = torch.Generator().manual_seed(5)
    off_grid = torch.zeros(2, d)
    off_grid[:, 1::7] = torch.randn(2, len(range(1, d, 7)), generator=gen)  # between samples
    sparse = torch.zeros(2, d)
    sparse[:, ::997] = 1.0 + torch.rand(2, len(range(0, d, 997)), generator=gen)
    return {
        "random": (torch.randn(2, d, generator=gen), torch.randn(2, d, generator=gen)),
        "tied": (tied_input(2, d, 1), tied_input(2, d, 2)),
        "off the sample's grid": (off_grid, torch.zeros(2, d)),
        "equal magnitudes": (torch.ones(2, d).neg_(), torch.zeros(2, d)),
        "mostly zeros": (sparse, torch.zeros(2, d)),
        "float64": (
            torch.randn(2, d, generator=gen, dtype=torch.float64),
            torch.randn(2, d, generator=gen, dtype=torch.float64),
        ),
    }


@pytest.mark.parametrize("k", [1, 37, 1_000, 5_000, 20_000])
def test_the_scan_gives_the_difference_topk_bit_for_bit(k: int) -> None:
    """TopK.compress_difference(a, b), by the one-pass scan, equals compress(a − b) by the
    partition path and brute force — indices and values — on rows built to mislead it."""
    d = SCAN_DIM
    for name, (a, b) in scan_cases().items():
        batch = TopK(d, k=k).compress_difference(a, b)
        z = a - b
        reference = TopK(d, k=k, method="numpy").compress(z)
        assert torch.equal(batch.indices, reference.indices), name
        assert torch.equal(batch.values, reference.values), name
        np.testing.assert_array_equal(batch.indices.numpy(), brute_topk(z.numpy(), k), name)


def test_the_scan_answers_alone_where_its_sample_is_fair_and_declines_elsewhere() -> None:
    """The fast path is taken on an ordinary row (so the test above measures it, not only the
    fallback) and refused, never guessed, where the sample cannot vouch for the answer."""
    d, k = SCAN_DIM, 1_000
    cases = scan_cases()
    a, b = (t[0].numpy() for t in cases["random"])
    assert scan_row(a, b, k) is not None
    assert scan_row(a, None, k) is not None
    a, b = (t[0].numpy() for t in cases["off the sample's grid"])
    assert scan_row(a, b, k) is None
    a, b = (t[0].numpy() for t in cases["equal magnitudes"])
    assert scan_row(a, b, k) is None
    with_nan = cases["random"][0][0].numpy().copy()
    with_nan[d // 2 + 1] = np.nan
    assert scan_row(with_nan, None, k) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_every_large_d_path_ranks_non_finite_values_as_the_sort_does(bad: float) -> None:
    """inf is the largest magnitude; NaN ranks below every number, on every path (the sort's
    rule, which "auto" follows for small d too): a row's NaN is sent only when fewer than k
    numbers are left, and the door then refuses the message (a diverged run stops there)."""
    d = 50_000
    a = torch.randn(1, d)
    a[0, 12_345] = bad
    b = torch.zeros(1, d)
    if math.isnan(bad):
        expected = topk_indices(a, 100, "sort")
        assert 12_345 not in expected[0].tolist()
        for method in ("auto", "numpy", "torch"):
            batch = TopK(d, k=100, method=method).compress_difference(a, b)
            assert torch.equal(batch.indices, expected), method
        nans = torch.full((2, d), math.nan)
        nans[1, :50] = 1.0  # 50 numbers, then the lowest-index NaNs
        for method in ("auto", "numpy", "torch", "sort"):
            chosen = topk_indices(nans, 100, method)
            assert chosen[0].tolist() == list(range(100)), method
            assert chosen[1].tolist() == list(range(100)), method
        return
    batch = TopK(d, k=100).compress_difference(a, b)
    assert 12_345 in batch.indices[0].tolist()
    assert torch.equal(batch.indices, TopK(d, k=100, method="numpy").compress(a - b).indices)


def test_topk_half_precision_input() -> None:
    d = SMALL_DIM + 100
    z = torch.randn(2, d).to(torch.bfloat16)
    batch = TopK(d, k=17).compress(z)
    assert batch.values.dtype == torch.bfloat16
    # The scan is compiled for float32/float64 only: asked for by name, it hands bfloat16 on.
    assert torch.equal(TopK(d, k=17, method="scan").compress(z).indices, batch.indices)
    np.testing.assert_array_equal(batch.indices.numpy(), brute_topk(z.float().numpy(), 17))


def test_topk_layer_scope_counts_and_selection() -> None:
    sizes = (30, 7, 5000, 1, 200)
    d = sum(sizes)
    comp = TopK(d, ratio=0.1, scope="layer", layer_sizes=sizes)
    expected_k = [max(1, math.floor(0.1 * s)) for s in sizes]
    assert comp.layer_k == tuple(expected_k) == (3, 1, 500, 1, 20)
    assert comp.k == sum(expected_k)
    z = tied_input(3, d, 5) + 0.001 * torch.randn(3, d)
    batch = comp.compress(z)
    batch.validate()  # globally sorted and unique
    start = 0
    for size, k_l in zip(sizes, expected_k, strict=True):
        idx = batch.indices.numpy()
        in_layer = idx[(idx >= start) & (idx < start + size)].reshape(3, -1)
        assert in_layer.shape[1] == k_l
        np.testing.assert_array_equal(
            in_layer - start, brute_topk(z[:, start : start + size].numpy(), k_l)
        )
        start += size


@settings(max_examples=50, deadline=None)
@given(
    d=st.integers(1, 60),
    data=st.data(),
)
def test_topk_contractive(d: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, d))
    z = torch.tensor(
        data.draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=d, max_size=d)),
        dtype=torch.float64,
    ).reshape(1, d)
    err = (TopK(d, k=k).compress(z).to_dense() - z).pow(2).sum()
    bound = (1 - k / d) * z.pow(2).sum()
    assert err <= bound * (1 + 1e-12) + 1e-12


def test_randk_unbiased() -> None:
    d, k, draws = 40, 8, 4000
    comp = RandK(d, k=k)
    z = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(1, d, dtype=torch.float64)
    for s in range(draws):
        total += comp.compress(z, [s]).to_dense()
    mean = total / draws
    # per-coordinate std of the mean: |z_j| sqrt((d/k − 1)/draws); allow 5 of them
    sigma = z.abs() * math.sqrt((d / k - 1) / draws)
    assert bool(((mean - z).abs() <= 5 * sigma + 1e-12).all())
    assert comp.omega == pytest.approx(d / k - 1)


def test_randk_scaling_and_regeneration() -> None:
    d, k = 100, 10
    comp = RandK(d, k=k)
    z = torch.randn(3, d)
    seeds = [11, 2**62 + 5, 0]
    batch = comp.compress(z, seeds)
    batch.validate()
    assert batch.seeds == tuple(seeds)
    for i, s in enumerate(seeds):
        idx = randk_indices(d, k, s)
        assert torch.equal(batch.indices[i], idx)
        torch.testing.assert_close(batch.values[i], z[i, idx.long()] * (d / k))
    assert comp.check(batch)
    tampered = type(batch)(batch.indices, batch.values, d, (12, *seeds[1:]))
    assert not comp.check(tampered)
    assert not torch.equal(randk_indices(d, k, 1), randk_indices(d, k, 2))


@settings(max_examples=300, deadline=None)
@given(
    dim=st.integers(1, 50_000),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**63 - 1),
)
def test_randperm_head_is_torchs_permutation_head(dim: int, share: float, seed: int) -> None:
    """Rand-k's O(k) regeneration gives torch.randperm's first k entries, bit for bit: the
    indices every worker and server drew before it existed (seeds past 32 bits included)."""
    k = round(share * dim)
    generator = torch.Generator().manual_seed(seed)
    assert torch.equal(randperm_head(dim, k, seed), torch.randperm(dim, generator=generator)[:k])


@pytest.mark.parametrize(("dim", "workers"), [(10, 3), (123, 20), (1000, 7), (4096, 4)])
def test_permk_blocks_up_to_the_shuffled_size_are_torchs_permutations(
    dim: int, workers: int
) -> None:
    """Up to SHUFFLED_DIM coordinates each worker's Perm-K block is its positions of the
    seed's torch.randperm (the wrapping last block included)."""
    assert dim <= SHUFFLED_DIM
    k = -(-dim // workers)
    for seed in (0, 3, 2**40 + 1):
        whole = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        for worker in range(workers + 1):  # + 1: the index is taken mod n
            start = worker % workers * k
            expected = torch.sort(whole[torch.arange(start, start + k) % dim]).values
            assert torch.equal(permk_block(dim, workers, seed, worker), expected.to(torch.int32))


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 20_000), seed=st.integers(0, 2**63 - 1))
def test_the_keyed_permutation_is_a_bijection(dim: int, seed: int) -> None:
    """Cycle-walking keeps the Feistel network a permutation of exactly range(d), any d."""
    values = keyed_permutation_at(dim, seed, np.arange(dim))
    assert np.array_equal(np.sort(values), np.arange(dim))


@pytest.mark.parametrize(("dim", "workers"), [(4097, 4097), (5000, 20), (10_007, 7), (65_536, 16)])
def test_permk_blocks_of_one_seed_cover_every_coordinate(dim: int, workers: int) -> None:
    """Above SHUFFLED_DIM too, the n blocks of one seed are k distinct coordinates each and
    together cover all d (disjoint when n divides d): the permutation the compressor promises."""
    assert dim > SHUFFLED_DIM
    k = -(-dim // workers)
    blocks = [permk_block(dim, workers, 11, w) for w in range(workers)]
    assert all(b.numel() == k and torch.unique(b).numel() == k for b in blocks)
    union = torch.cat(blocks)
    assert torch.equal(torch.unique(union), torch.arange(dim, dtype=torch.int32))
    if dim % workers == 0:
        assert union.numel() == dim


@pytest.mark.parametrize(("dim", "workers"), [(10, 3), (4097, 3), (5000, 20), (10_007, 7)])
def test_a_server_tells_a_permk_block_from_anything_else(dim: int, workers: int) -> None:
    """`is_permk_block` (the server's check, through π⁻¹ above SHUFFLED_DIM) accepts each
    worker's block, the wrapping last one included, and nothing else: not another worker's,
    not another seed's, not the block with one index moved."""
    for worker in range(workers):
        block = permk_block(dim, workers, 11, worker)
        assert is_permk_block(block, dim, workers, 11, worker)
        assert is_permk_block(block, dim, workers, 11, worker + workers)  # taken mod n
        assert not is_permk_block(block, dim, workers, 11, (worker + 1) % workers)
        assert not is_permk_block(block, dim, workers, 12, worker)
        outside = sorted(set(range(dim)) - set(block.tolist()))[0]
        moved = torch.sort(torch.cat([block[1:], torch.tensor([outside], dtype=torch.int32)]))
        assert not is_permk_block(moved.values, dim, workers, 11, worker)
        assert not is_permk_block(block[1:], dim, workers, 11, worker)


def test_a_permk_coordinate_lies_in_a_block_with_probability_k_over_d() -> None:
    """Unbiasedness needs P(j ∈ B_i) = k/d over the seeds for every coordinate j. Counted over
    2,000 seeds at d = 5,000 and k = 250, the χ² statistic of the 5,000 counts stays within 4
    standard deviations of its mean (the counts of one seed sum to k, so the statistic is
    scaled by 1/(1 − k/d))."""
    dim, workers, seeds = 5000, 20, 2000
    k = dim // workers
    counts = np.zeros(dim)
    for seed in range(seeds):
        counts[permk_block(dim, workers, seed, 7).numpy()] += 1
    expected = seeds * k / dim
    chi2 = ((counts - expected) ** 2 / expected).sum() / (1 - k / dim)
    df = dim - 1
    assert abs(chi2 - df) < 4 * math.sqrt(2 * df), chi2


def test_a_permk_block_costs_its_own_size_whatever_d_is() -> None:
    """The last of 2²² workers' blocks over d = 2³¹ − 1 coordinates (the largest index the
    wire holds): 512 positions evaluated, nothing of size d (a shuffle would need 16 GB)."""
    dim, workers = 2**31 - 1, 2**22
    block = permk_block(dim, workers, 5, workers - 1)
    k = -(-dim // workers)
    assert block.numel() == k and torch.unique(block).numel() == k
    assert int(block.min()) >= 0 and int(block.max()) < dim


def test_randperm_head_falls_back_to_torch_where_its_draws_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another torch may shuffle differently: then (the once-per-process check fails) the
    head is torch's own, so Rand-k's indices never depend on which path drew them."""
    import byzps.common.compressors._permutation as permutation

    assert permutation.head_matches_torch()  # this torch: the fast path is the one tested above
    monkeypatch.setattr(permutation, "head_matches_torch", lambda: False)
    calls: list[int] = []
    monkeypatch.setattr(permutation, "_head", lambda *a: calls.append(1))  # must not be used
    generator = torch.Generator().manual_seed(11)
    assert torch.equal(randperm_head(1000, 30, 11), torch.randperm(1000, generator=generator)[:30])
    assert not calls
    with pytest.raises(ValueError, match="k must be in"):
        randperm_head(10, 11, 0)


def test_randk_needs_one_seed_per_row() -> None:
    comp = RandK(10, k=2)
    with pytest.raises(ValueError, match="seeds"):
        comp.compress(torch.randn(2, 10))
    with pytest.raises(ValueError, match="seeds"):
        comp.compress(torch.randn(2, 10), [1])


def test_identity_exact() -> None:
    z = torch.randn(4, 33, dtype=torch.float64)
    comp = Identity(33)
    batch = comp.compress(z)
    batch.validate()
    assert comp.k == 33 and comp.alpha == 1.0 and comp.omega == 0.0 and comp.unbiased
    assert torch.equal(batch.to_dense(), z)
    assert torch.equal(batch.indices[2], torch.arange(33, dtype=INDEX_DTYPE))


def test_registry_and_factory() -> None:
    assert {"topk", "randk", "identity"} <= set(COMPRESSORS.names())
    comp = build_compressor("topk", 100, layer_sizes=[60, 40], ratio=0.1, scope="layer")
    assert isinstance(comp, TopK) and comp.k == 10
    assert build_compressor("randk", 50, k=5).k == 5
    assert build_compressor("identity", 7).k == 7
    with pytest.raises(ValueError, match="ratio"):
        build_compressor("identity", 7, ratio=0.5)
    with pytest.raises(ValueError, match="nope"):
        build_compressor("nope", 7)


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"k": 11}, "k"),
        ({"k": 0}, "k"),
        ({"k": 2.5}, "k"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({}, "k and ratio"),
        ({"k": 2, "ratio": 0.5}, "k and ratio"),
        ({"k": 2, "layer_sizes": [5, 4]}, "layer_sizes"),
        ({"k": 2, "layer_sizes": [10, 0]}, "layer_sizes"),
        ({"ratio": 0.5, "scope": "row"}, "scope"),
        ({"ratio": 0.5, "scope": "layer"}, "layer_sizes"),
        ({"k": 2, "scope": "layer", "layer_sizes": [5, 5]}, "k"),
        ({"k": 2, "method": "fast"}, "method"),
    ],
)
def test_topk_bad_parameters(params: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        TopK(10, **params)


def test_bad_dim_and_shape() -> None:
    with pytest.raises(ValueError, match="dim"):
        TopK(0, k=1)
    with pytest.raises(ValueError, match="k"):
        RandK(10, k=20)
    with pytest.raises(ValueError, match="shape"):
        TopK(10, k=2).compress(torch.randn(10))
    with pytest.raises(ValueError, match="shape"):
        Identity(10).compress(torch.randn(2, 11))
