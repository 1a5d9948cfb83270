"""The compressor interface, its registry, and the parameter checks every constructor shares.

Contractive compressors (Top-k, scaled sign) satisfy E‖C(z) − z‖² ≤ (1 − α)‖z‖²; unbiased ones
(Rand-k scaled by d/k, QSGD, natural compression, Perm-K) satisfy E[Q(z)] = z and
E‖Q(z) − z‖² ≤ ω‖z‖². Every row of one call gets the same nnz, so a whole cohort's messages are
processed with batched ops.

Sparsifiers (Top-k, Rand-k, Perm-K, identity) send index/value pairs and take a `values`
parameter: the dtype their kept values are rounded to ("float32", "float16", "bfloat16").
Rounding is part of the compression — the worker's error feedback sees exactly what the server
receives — and halves the value bytes on the wire. The quantizers (QSGD, natural compression and
dithering, scaled sign) have their own value code and travel packed
(byzps.common.compressors.codes), so they take no `values`: a cast would only blur their grid.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from byzps.common.registry import Registry
from byzps.common.seeding import derive_seed
from byzps.common.sparse import INDEX_DTYPE, SparseBatch

COMPRESSORS: Registry[Compressor] = Registry(
    "compressor", supplied=("dim", "layer_sizes", "num_workers")
)

#: The value dtypes a sparsifier may round its values to, by config name.
VALUE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: The largest finite float16; a sparsifier with values = "float16" saturates to ±this.
FLOAT16_MAX = 65504.0


class Compressor(ABC):
    """Maps (w, d) dense rows to a SparseBatch with `k` non-zeros per row.

    `k` is also the k_max the server enforces on every message, honest or Byzantine.
    """

    name: ClassVar[str]
    #: True for compressors with E[C(z)] = z (Rand-k, QSGD, natural, Perm-K, identity).
    unbiased: ClassVar[bool]
    #: True when `compress` needs one seed per row (`row_seeds` derives them).
    seeded: ClassVar[bool] = False
    #: True when the values travel as a packed code instead of index/value pairs.
    packed: ClassVar[bool] = False

    def __init__(self, dim: int, values: str = "float32") -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if values not in VALUE_DTYPES:
            raise ValueError(f"values must be one of {sorted(VALUE_DTYPES)}, got {values!r}")
        self.dim = dim
        self.values = values

    @property
    @abstractmethod
    def k(self) -> int:
        """Non-zeros in every compressed row."""

    def payload_bytes(self, batch: SparseBatch) -> int:
        """Payload bytes of `batch`'s messages as the server counts them on arrival
        (validation's `Update.wire_bytes`): an index and a value per entry. The simulator counts
        with this, so its `bytes_uplink` equals the gRPC server's for every compressor."""
        entry = INDEX_DTYPE.itemsize + VALUE_DTYPES[self.values].itemsize
        return entry * batch.nnz * batch.num_rows

    @property
    def alpha(self) -> float:
        """Contraction factor α of the messages error feedback sends (`ef_factor` · C): k/d for
        Top-k; for an unbiased C, 1/(ω + 1) when ω ≥ 1 (k/d for Rand-k) and 1 − ω when ω < 1
        (then E‖Q(z) − z‖² = ω‖z‖² = (1 − α)‖z‖² unscaled; 1 for identity)."""
        if not self.unbiased:
            return self.k / self.dim
        return 1.0 / (self.omega + 1.0) if self.omega >= 1.0 else 1.0 - self.omega

    @property
    def omega(self) -> float:
        """Variance factor ω of an unbiased compressor (d/k − 1 for Rand-k, 0 for identity)."""
        return self.dim / self.k - 1.0

    @property
    def ef_factor(self) -> float:
        """The factor the error-feedback estimators (EF21 family, `state` rule) apply to C's
        messages so that they contract: 1/(ω + 1) for an unbiased C with ω ≥ 1, else 1.

        Why: tracking g ← g + c with c = Q(t − g) leaves the error e = t − g to the recursion
        e′ = e − Q(e), with E‖e′‖² = ω‖e‖² — growing for ω > 1. Q/(ω + 1) is contractive with
        α = 1/(ω + 1) (Richtárik, Sokolov, Fatkhullin, "EF21: a new, simpler, theoretically
        better, and practically faster error feedback", NeurIPS 2021), so the states converge. An
        unbiased Q with ω < 1 (natural compression, ω = 1/8) already contracts, α = 1 − ω, and
        stays unscaled, so its values stay on its code."""
        if self.unbiased and self.omega >= 1.0:
            return 1.0 / (self.omega + 1.0)
        return 1.0

    def scaled(self, batch: SparseBatch, factor: float) -> SparseBatch:
        """`batch` (this compressor's output) times `factor`, still in this compressor's value
        format: values rounded to `values` again, quantizers' scales moved (see Quantizer)."""
        values = batch.values * factor
        if self.values != "float32":
            values = cast_values(values, self.values)
        scales = None if batch.scales is None else (batch.scales * factor).to(torch.float32)
        return SparseBatch(batch.indices, values, batch.dim, batch.seeds, scales)

    def row_seeds(self, seed: int, worker_ids: Sequence[int], round: int) -> tuple[int, ...]:
        """The seeds of the rows of `worker_ids` in `round` (seeded compressors only): one
        independent stream per worker, derive_seed(run seed, name, worker id, round)."""
        return tuple(derive_seed(seed, self.name, int(i), round) for i in worker_ids)

    def compress(
        self,
        z: Tensor,
        seeds: Sequence[int] | None = None,
        workers: Sequence[int] | None = None,
    ) -> SparseBatch:
        """Compress each row of `z` (shape (w, d)); `seeds` has one entry per row when seeded,
        `workers` the worker id of each row (Perm-K's block). Values are rounded to `values`."""
        return self.compress_difference(z, None, seeds, workers)

    def compress_difference(
        self,
        a: Tensor,
        b: Tensor | None,
        seeds: Sequence[int] | None = None,
        workers: Sequence[int] | None = None,
    ) -> SparseBatch:
        """`compress(a − b)` (`compress(a)` when b is None), bit for bit. Error feedback sends
        C(target − g); a compressor that can select from a and b directly (Top-k on the CPU)
        never materialises the d-sized difference."""
        self._check_rows(a)
        if b is not None and b.shape != a.shape:
            raise ValueError(f"b must have the shape of a, {tuple(a.shape)}, got {tuple(b.shape)}")
        if self.seeded and (seeds is None or len(seeds) != a.shape[0]):
            raise ValueError(f"seeds: {self.name} needs one seed per row ({a.shape[0]})")
        if b is None:
            batch = self._compress(a, seeds, workers)
        else:
            batch = self._compress_difference(a, b, seeds, workers)
        if self.values == "float32":
            return batch
        return SparseBatch(
            batch.indices, cast_values(batch.values, self.values), batch.dim, batch.seeds
        )

    @abstractmethod
    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        """The compression itself, on checked rows."""

    def _compress_difference(
        self, a: Tensor, b: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        """The compression of a − b, on checked rows; by default of the materialised difference."""
        return self._compress(a - b, seeds, workers)

    def _check_rows(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (w, {self.dim}), got {tuple(z.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, k={self.k})"


def cast_values(values: Tensor, dtype: str) -> Tensor:
    """Round `values` to `dtype` (round to nearest even) and back to their own dtype.

    float16 saturates at ±65504 instead of overflowing to ±inf: the server refuses non-finite
    values, and an honest worker whose message was refused would never get its update through.
    The part cut off stays in the worker's error (error feedback sends it later); under an
    unbiased compressor the saturation is a bias only for |values| > 65504. bfloat16 has
    float32's range and never overflows from a finite float32.
    """
    target = VALUE_DTYPES[dtype]
    if dtype == "float16":
        values = values.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return values.to(target).to(values.dtype)


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


def check_int(name: str, value: object, low: int, high: int) -> int:
    """An int in [low, high], or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def row_generator(seed: int) -> torch.Generator:
    """A CPU generator for one row's draws, so every device draws the same numbers."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen
