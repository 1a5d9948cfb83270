"""Sparse vectors: what a compressor produces and what travels on the wire.

Indices are int32 (not int64) because the wire format packs them as little-endian uint32: for the
non-negative indices of a vector with fewer than 2**31 coordinates the bytes are identical, so the
codec serialises them without a conversion pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

INDEX_DTYPE = torch.int32


@lru_cache(maxsize=4)
def _arange(dim: int, device: torch.device) -> Tensor:
    return torch.arange(dim, dtype=INDEX_DTYPE, device=device)


def dense_indices(rows: int, dim: int, device: torch.device | str = "cpu") -> Tensor:
    """(rows, dim) indices of dense rows: arange(dim) in every row.

    One row is a shared, cached tensor (decoding a dense update, the server's hottest path, would
    otherwise build a fresh arange of d for every push: ~0.6 ms at d = 1e6). Sharing is safe
    because nothing in byzps writes indices in place; several rows get their own copy.
    """
    row = _arange(dim, torch.device(device))
    return row[None] if rows == 1 else row.expand(rows, dim).clone()


def _check_indices(indices: Tensor, dim: int) -> None:
    """Raise ValueError unless every row of `indices` is strictly increasing and inside [0, dim)."""
    if indices.dtype != INDEX_DTYPE:
        raise ValueError(f"indices must be {INDEX_DTYPE}, got {indices.dtype}")
    if indices.numel() == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= dim:
        raise ValueError(f"indices out of range [0, {dim})")
    if indices.shape[-1] > 1 and not bool((indices[..., 1:] > indices[..., :-1]).all()):
        raise ValueError("indices must be strictly increasing (sorted, unique)")


@dataclass(frozen=True)
class SparseVector:
    """A vector of dimension `dim` holding `values` at the strictly increasing `indices`.

    `seed` is set by the compressors whose receiver checks the coordinate selection (Rand-k,
    Perm-K): it lets the receiver regenerate it. `scale` is set by the quantizers whose code
    stores one scale per message (QSGD's ‖z‖, scaled sign's ‖z‖₁/d): the values are that scale
    times a code point, and the packed wire form sends the two apart.
    """

    indices: Tensor
    values: Tensor
    dim: int
    seed: int | None = None
    scale: float | None = None

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def validate(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError("indices and values must be 1-D")
        if self.indices.numel() != self.values.numel():
            raise ValueError(f"{self.indices.numel()} indices but {self.values.numel()} values")
        _check_indices(self.indices, self.dim)
        if not bool(torch.isfinite(self.values).all()):
            raise ValueError("values must be finite")

    def to_dense(self) -> Tensor:
        out = torch.zeros(self.dim, dtype=self.values.dtype, device=self.values.device)
        self.add_to(out)
        return out

    def add_to(self, dense: Tensor, alpha: float = 1.0) -> None:
        """dense[indices] += alpha * values, in place (indices are unique, so no collisions)."""
        if self.nnz == self.dim:  # sorted, unique, in range and complete: the indices are arange
            dense.add_(self.values, alpha=alpha)
        else:
            dense.index_add_(0, self.indices, self.values, alpha=alpha)


@dataclass(frozen=True)
class SparseBatch:
    """One k-sparse message per worker, stacked: `indices` and `values` have shape (w, k).

    Every compressor emits the same nnz for every row (Top-k and Rand-k fix k), which is what lets
    the simulator process all workers' messages with one batched op.
    """

    indices: Tensor
    values: Tensor
    dim: int
    seeds: tuple[int, ...] | None = None
    #: One float32 scale per row, for the quantizers whose code has one (see SparseVector).
    scales: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])

    @property
    def nnz(self) -> int:
        """Non-zeros per row."""
        return int(self.indices.shape[1])

    def to(self, device: torch.device) -> SparseBatch:
        """The same messages on `device` (this batch itself when already there)."""
        if self.indices.device == device and self.values.device == device:
            return self
        return SparseBatch(
            self.indices.to(device),
            self.values.to(device),
            self.dim,
            self.seeds,
            None if self.scales is None else self.scales.to(device),
        )

    def take(self, rows: Tensor) -> SparseBatch:
        """The messages of `rows` (indices into this batch), in that order."""
        picked = rows.tolist()
        return SparseBatch(
            self.indices[rows],
            self.values[rows],
            self.dim,
            None if self.seeds is None else tuple(self.seeds[i] for i in picked),
            None if self.scales is None else self.scales[rows],
        )

    def row(self, i: int) -> SparseVector:
        seed = None if self.seeds is None else self.seeds[i]
        scale = None if self.scales is None else float(self.scales[i])
        return SparseVector(self.indices[i], self.values[i], self.dim, seed, scale)

    def rows(self) -> list[SparseVector]:
        return [self.row(i) for i in range(self.num_rows)]

    @staticmethod
    def stack(vectors: Sequence[SparseVector]) -> SparseBatch:
        """Stack vectors of one dim and one nnz (the inverse of `rows`)."""
        if not vectors:
            raise ValueError("cannot stack an empty sequence")
        dim = vectors[0].dim
        if any(v.dim != dim or v.nnz != vectors[0].nnz for v in vectors):
            raise ValueError("stacked vectors must share dim and nnz")
        seeds = None
        if all(v.seed is not None for v in vectors):
            seeds = tuple(int(v.seed) for v in vectors)  # type: ignore[arg-type]
        scales = None
        if all(v.scale is not None for v in vectors):
            scales = torch.tensor([v.scale for v in vectors], dtype=torch.float32)
        return SparseBatch(
            torch.stack([v.indices for v in vectors]),
            torch.stack([v.values for v in vectors]),
            dim,
            seeds,
            scales,
        )

    def validate(self) -> None:
        if self.indices.dim() != 2 or self.indices.shape != self.values.shape:
            raise ValueError("indices and values must both have shape (w, k)")
        _check_indices(self.indices, self.dim)
        if not bool(torch.isfinite(self.values).all()):
            raise ValueError("values must be finite")

    def to_dense(self) -> Tensor:
        out = torch.zeros(
            self.num_rows, self.dim, dtype=self.values.dtype, device=self.values.device
        )
        self.add_to(out)
        return out

    def add_to(self, dense: Tensor, alpha: float = 1.0) -> None:
        """dense[i, indices[i]] += alpha * values[i] for every row i, in place."""
        if self.nnz == self.dim:
            dense.add_(self.values, alpha=alpha)
        else:
            dense.scatter_add_(
                1, self.indices.long(), self.values * alpha if alpha != 1.0 else self.values
            )
