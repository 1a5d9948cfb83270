"""Compressors: turn dense rows (w, d) into k-sparse rows (a SparseBatch).

Contractive compressors (Top-k) satisfy E‖C(z) − z‖² ≤ (1 − α)‖z‖²; unbiased ones (Rand-k scaled by
d/k) satisfy E[Q(z)] = z with variance factor ω = d/k − 1. Every row of one call gets the same nnz,
so a whole cohort's messages are processed with batched ops.

Top-k selection is the hot path of every worker, so it has three interchangeable implementations
that return identical indices (a test checks it): numpy (np.partition threshold, the fastest on CPU
for large d), a stable torch sort (vectorised over the whole batch, best for small d) and a torch
threshold path for non-CPU devices. Ties are always broken towards the lower index, which makes the
selection a pure function of z — the simulator and a gRPC worker send the same bytes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from byzps.common.registry import Registry
from byzps.common.sparse import INDEX_DTYPE, SparseBatch

COMPRESSORS: Registry[Compressor] = Registry("compressor", supplied=("dim", "layer_sizes"))

#: Below this many coordinates one stable sort over the whole (w, d) batch beats per-row partition.
SMALL_DIM = 4096
TOPK_METHODS = ("auto", "numpy", "sort", "torch")


class Compressor(ABC):
    """Maps (w, d) dense rows to a SparseBatch with `k` non-zeros per row.

    `k` is also the k_max the server enforces on every message, honest or Byzantine.
    """

    name: ClassVar[str]
    #: True for compressors with E[C(z)] = z (Rand-k, identity).
    unbiased: ClassVar[bool]
    #: True when `compress` needs one seed per row.
    seeded: ClassVar[bool] = False

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim

    @property
    @abstractmethod
    def k(self) -> int:
        """Non-zeros in every compressed row."""

    @property
    def alpha(self) -> float:
        """Contraction factor α (k/d for Top-k and the scaled-down Rand-k; 1 for identity)."""
        return self.k / self.dim

    @property
    def omega(self) -> float:
        """Variance factor ω of an unbiased compressor (d/k − 1 for Rand-k, 0 for identity)."""
        return self.dim / self.k - 1.0

    @abstractmethod
    def compress(self, z: Tensor, seeds: Sequence[int] | None = None) -> SparseBatch:
        """Compress each row of `z` (shape (w, d)); `seeds` has one entry per row when seeded."""

    def _check_rows(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (w, {self.dim}), got {tuple(z.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, k={self.k})"


# ----------------------------------------------------------------------------------------------
# Parameter checks shared by the constructors
# ----------------------------------------------------------------------------------------------


def resolve_k(dim: int, k: int | None, ratio: float | None) -> int:
    """k from exactly one of a count `k` (1 ≤ k ≤ dim) or a `ratio` ∈ (0, 1]: max(1, ⌊ratio·d⌋)."""
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k and ratio")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an int, got {k!r}")
        if not 1 <= k <= dim:
            raise ValueError(f"k must be in [1, dim={dim}], got {k}")
        return int(k)
    assert ratio is not None
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return max(1, math.floor(ratio * dim))


def check_layer_sizes(dim: int, layer_sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    """Positive ints summing to dim, or None."""
    if layer_sizes is None:
        return None
    sizes = tuple(int(s) for s in layer_sizes)
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"layer_sizes must be positive, got {sizes}")
    if sum(sizes) != dim:
        raise ValueError(f"layer_sizes sum to {sum(sizes)}, not dim={dim}")
    return sizes


# ----------------------------------------------------------------------------------------------
# Top-k selection: k largest |z| per row, ties to the lower index, indices ascending
# ----------------------------------------------------------------------------------------------


def _topk_numpy(z: Tensor, k: int) -> Tensor:
    """Threshold t = k-th largest |z| per row via np.partition, then flatnonzero (already sorted).

    O(d) per row instead of torch.topk's heap. Rows are processed one at a time: a 4 MB row stays
    in cache across abs, partition and compare, which measured ~1.5× faster than one batched
    partition over (w, d). A row with more than k entries ≥ t (ties at t) drops its highest-index
    ties.
    """
    w, d = z.shape
    zz = z.detach().cpu()
    if zz.dtype not in (torch.float32, torch.float64):
        zz = zz.float()
    rows = zz.numpy()
    out = np.empty((w, k), dtype=np.int32)
    for r in range(w):
        a = np.abs(rows[r])
        t = np.partition(a, d - k)[d - k]
        idx = np.flatnonzero(a >= t)
        if idx.size > k:
            tied = np.flatnonzero(a[idx] == t)
            idx = np.delete(idx, tied[tied.size - (idx.size - k) :])
        elif idx.size < k:
            raise ValueError("Top-k input must be finite")
        out[r] = idx
    return torch.from_numpy(out)


def _topk_sort(z: Tensor, k: int) -> Tensor:
    """One stable sort of −|z| over the whole batch: equal magnitudes keep index order."""
    order = torch.sort(-z.detach().abs(), dim=1, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values.to(INDEX_DTYPE)


def _topk_torch(z: Tensor, k: int) -> Tensor:
    """Device-agnostic threshold path: topk finds t, then the same tie rule as the numpy path."""
    w = z.shape[0]
    a = z.detach().abs()
    t = torch.topk(a, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = a > t
    tied = a == t
    need = k - above.sum(dim=1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=1) <= need))
    if int(keep.sum()) != w * k:
        raise ValueError("Top-k input must be finite")
    return keep.nonzero()[:, 1].reshape(w, k).to(INDEX_DTYPE)


def topk_indices(z: Tensor, k: int, method: str = "auto") -> Tensor:
    """(w, k) int32 indices of the k largest |z| per row, ascending; ties go to the lower index.

    `method` picks the implementation ("auto": sort for d ≤ SMALL_DIM, numpy on CPU, torch on
    other devices); all return the same indices.
    """
    if method not in TOPK_METHODS:
        raise ValueError(f"method must be one of {TOPK_METHODS}, got {method!r}")
    d = z.shape[1]
    if k == d:
        return torch.arange(d, dtype=INDEX_DTYPE, device=z.device).expand(z.shape[0], d).clone()
    if method == "auto":
        on_cpu = z.device.type == "cpu"
        method = "sort" if d <= SMALL_DIM else ("numpy" if on_cpu else "torch")
    if method == "numpy":
        return _topk_numpy(z, k).to(z.device)
    if method == "sort":
        return _topk_sort(z, k)
    return _topk_torch(z, k)


def _gather(z: Tensor, indices: Tensor) -> Tensor:
    return torch.gather(z.detach(), 1, indices.long())


@COMPRESSORS.register("topk")
class TopK(Compressor):
    """Top-k: C(z) keeps the k largest |z_j| of each row unchanged (α = k/d, biased).

    scope="global" selects over the flat vector; scope="layer" selects k_l = max(1, ⌊ratio·d_l⌋)
    inside every parameter tensor (the authors' setting), so k = Σ k_l.
    """

    name = "topk"
    unbiased = False

    def __init__(
        self,
        dim: int,
        *,
        k: int | None = None,
        ratio: float | None = None,
        scope: str = "global",
        layer_sizes: Sequence[int] | None = None,
        method: str = "auto",
    ) -> None:
        super().__init__(dim)
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if method not in TOPK_METHODS:
            raise ValueError(f"method must be one of {TOPK_METHODS}, got {method!r}")
        self.scope = scope
        self.method = method
        self.layer_sizes = check_layer_sizes(dim, layer_sizes)
        self.ratio = ratio
        if scope == "layer":
            if self.layer_sizes is None:
                raise ValueError("layer_sizes are required for scope='layer'")
            if k is not None:
                raise ValueError("k: scope='layer' takes a ratio, not a count")
            if ratio is None:
                raise ValueError("ratio is required for scope='layer'")
            resolve_k(dim, None, ratio)  # validates ratio
            self.layer_k = tuple(resolve_k(s, None, ratio) for s in self.layer_sizes)
            self._k = sum(self.layer_k)
        else:
            self._k = resolve_k(dim, k, ratio)
            self.layer_k = (self._k,)

    @property
    def k(self) -> int:
        return self._k

    def indices(self, z: Tensor) -> Tensor:
        """The (w, k) selection, without building the batch (also used by attacks and tests)."""
        self._check_rows(z)
        if self.scope == "global":
            return topk_indices(z, self._k, self.method)
        assert self.layer_sizes is not None
        parts, start = [], 0
        for size, k_l in zip(self.layer_sizes, self.layer_k, strict=True):
            parts.append(topk_indices(z[:, start : start + size], k_l, self.method) + start)
            start += size
        return torch.cat(parts, dim=1)

    def compress(self, z: Tensor, seeds: Sequence[int] | None = None) -> SparseBatch:
        del seeds  # deterministic
        idx = self.indices(z)
        return SparseBatch(idx, _gather(z, idx), self.dim)


# ----------------------------------------------------------------------------------------------
# Rand-k
# ----------------------------------------------------------------------------------------------


def randk_indices(dim: int, k: int, seed: int, device: str | torch.device = "cpu") -> Tensor:
    """The k coordinates (ascending, int32) that Rand-k draws for `seed`: a server regenerates them
    from the seed in a message to check it. Drawn on CPU so every device agrees."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    idx = torch.randperm(dim, generator=gen)[:k]
    return torch.sort(idx).values.to(device=device, dtype=INDEX_DTYPE)


@COMPRESSORS.register("randk")
class RandK(Compressor):
    """Rand-k: Q(z) keeps k seeded uniformly drawn coordinates scaled by d/k (E[Q(z)] = z,
    ω = d/k − 1). The seed of each row travels in the batch so the receiver can regenerate it."""

    name = "randk"
    unbiased = True
    seeded = True

    def __init__(
        self,
        dim: int,
        *,
        k: int | None = None,
        ratio: float | None = None,
        layer_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim)
        self.layer_sizes = check_layer_sizes(dim, layer_sizes)  # accepted for a uniform factory
        self._k = resolve_k(dim, k, ratio)

    @property
    def k(self) -> int:
        return self._k

    def indices_for(self, seed: int, device: str | torch.device = "cpu") -> Tensor:
        return randk_indices(self.dim, self._k, seed, device)

    def check(self, batch: SparseBatch) -> bool:
        """True iff every row's indices are the ones its seed generates."""
        if batch.seeds is None or len(batch.seeds) != batch.num_rows or batch.nnz != self._k:
            return False
        return all(
            torch.equal(batch.indices[i].cpu(), self.indices_for(s))
            for i, s in enumerate(batch.seeds)
        )

    def compress(self, z: Tensor, seeds: Sequence[int] | None = None) -> SparseBatch:
        self._check_rows(z)
        if seeds is None or len(seeds) != z.shape[0]:
            raise ValueError(f"seeds: Rand-k needs one seed per row ({z.shape[0]})")
        seeds = tuple(int(s) for s in seeds)
        idx = torch.stack([self.indices_for(s, z.device) for s in seeds])
        values = _gather(z, idx) * (self.dim / self._k)
        return SparseBatch(idx, values, self.dim, seeds)


# ----------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------


@COMPRESSORS.register("identity")
class Identity(Compressor):
    """C(z) = z, sent densely (k = d); the uncompressed baselines use it."""

    name = "identity"
    unbiased = True

    def __init__(self, dim: int, *, layer_sizes: Sequence[int] | None = None) -> None:
        super().__init__(dim)
        self.layer_sizes = check_layer_sizes(dim, layer_sizes)

    @property
    def k(self) -> int:
        return self.dim

    def compress(self, z: Tensor, seeds: Sequence[int] | None = None) -> SparseBatch:
        del seeds
        self._check_rows(z)
        idx = torch.arange(self.dim, dtype=INDEX_DTYPE, device=z.device).expand(z.shape[0], -1)
        return SparseBatch(idx.clone(), z.detach().clone(), self.dim)


def dense_batch(z: Tensor) -> SparseBatch:
    """Rows of `z` as a SparseBatch with nnz = d (MARINA's full rounds are dense by design)."""
    return Identity(z.shape[1]).compress(z)


def build_compressor(
    name: str, dim: int, layer_sizes: Sequence[int] | None = None, **params: Any
) -> Compressor:
    """Construct compressor `name` from configuration; bad parameters raise ValueError."""
    return COMPRESSORS.build(name, dim=dim, layer_sizes=layer_sizes, **params)
