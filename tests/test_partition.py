"""Partitioners: disjoint, covering, non-empty, deterministic, and with the promised skew."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from byzps.common.tasks.partition import PARTITIONERS, partition

SCHEMES = sorted(PARTITIONERS)


def balanced_labels(classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def label_histograms(labels: np.ndarray, shards: list[torch.Tensor], classes: int) -> np.ndarray:
    """(n, classes) label frequencies of every shard, rows summing to 1."""
    counts = np.stack([np.bincount(labels[s.numpy()], minlength=classes) for s in shards])
    return counts / counts.sum(axis=1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n_rows=st.integers(1, 400),
    num_workers=st.integers(1, 25),
    classes=st.integers(1, 10),
    seed=st.integers(0, 2**40),
    alpha=st.floats(0.01, 100.0),
)
def test_shards_are_disjoint_covering_and_nonempty(
    scheme: str, n_rows: int, num_workers: int, classes: int, seed: int, alpha: float
) -> None:
    if n_rows < num_workers:
        n_rows = num_workers
    labels = np.random.default_rng(seed).integers(0, classes, n_rows)
    shards = partition(labels, num_workers, scheme=scheme, seed=seed, alpha=alpha)
    assert len(shards) == num_workers
    assert all(s.dtype == torch.int64 and s.numel() >= 1 for s in shards)
    assert all(bool((s[1:] > s[:-1]).all()) for s in shards)  # sorted, so unique within a shard
    together = torch.cat(shards).sort().values
    assert torch.equal(together, torch.arange(n_rows))  # disjoint and covering


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_by_seed(scheme: str) -> None:
    labels = balanced_labels(10, 50)
    first = partition(labels, 7, scheme=scheme, seed=3, alpha=0.3)
    again = partition(torch.from_numpy(labels), 7, scheme=scheme, seed=3, alpha=0.3)
    other = partition(labels, 7, scheme=scheme, seed=4, alpha=0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    shards = partition(balanced_labels(2, 501), 20, scheme="iid", seed=0)
    sizes = [s.numel() for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1002


def test_sorted_mix_is_half_label_sorted_half_iid() -> None:
    classes, per_class, n = 10, 200, 10
    labels = balanced_labels(classes, per_class)
    shards = partition(labels, n, scheme="sorted-mix", seed=1)
    sizes = [s.numel() for s in shards]
    assert max(sizes) - min(sizes) <= 2
    hist = label_histograms(labels, shards, classes)
    dominant = hist.argmax(axis=1)
    # The sorted half gives each worker (about) one class; the iid half adds ~5% of every class.
    assert (hist.max(axis=1) > 0.4).all() and hist.max(axis=1).mean() > 0.5
    assert (
        np.diff(dominant) >= 0
    ).all()  # worker 0 holds the lowest labels, worker n−1 the highest
    assert (hist > 0).sum(axis=1).min() >= 8  # the iid half spreads nearly all classes everywhere
    iid_hist = label_histograms(labels, partition(labels, n, scheme="iid", seed=1), classes)
    assert iid_hist.max() < 0.25


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    classes = 10
    labels = balanced_labels(classes, 300)
    overall = np.full(classes, 1 / classes)

    def skew(alpha: float) -> float:
        """Mean total-variation distance of the workers' label mix from the overall one."""
        values = []
        for seed in range(5):
            shards = partition(labels, 10, scheme="dirichlet", seed=seed, alpha=alpha)
            hist = label_histograms(labels, shards, classes)
            values.append(0.5 * np.abs(hist - overall).sum(axis=1).mean())
        return float(np.mean(values))

    skews = [skew(alpha) for alpha in (100.0, 1.0, 0.05)]
    assert skews[0] < 0.1 and skews[0] < skews[1] < skews[2] and skews[2] > 0.6


def test_dirichlet_gives_every_worker_data_even_when_very_skewed() -> None:
    labels = balanced_labels(2, 20)
    for seed in range(20):
        shards = partition(labels, 30, scheme="dirichlet", seed=seed, alpha=0.01)
        assert min(s.numel() for s in shards) >= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "bogus"}, "unknown split 'bogus'"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha > 0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(np.zeros(10, dtype=int), 2, seed=0, **kwargs)


def test_too_few_examples() -> None:
    with pytest.raises(ValueError, match="cannot split 3 examples among 4 workers"):
        partition(np.zeros(3, dtype=int), 4, scheme="iid", seed=0)
