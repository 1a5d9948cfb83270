"""Compressors: turn dense rows (w, d) into messages (a SparseBatch) — see base.py for the
contract, sparsifiers.py (Top-k, Rand-k, Perm-K, identity) and quantizers.py (QSGD, natural
compression and dithering, scaled sign, whose values travel as the packed codes of codes.py).

Importing this package registers every compressor in COMPRESSORS.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from byzps.common.compressors.base import (
    COMPRESSORS,
    VALUE_DTYPES,
    Compressor,
    cast_values,
    check_layer_sizes,
    resolve_k,
)
from byzps.common.compressors.quantizers import (
    QSGD,
    Natural,
    NaturalDithering,
    Quantizer,
    ScaledSign,
)
from byzps.common.compressors.sparsifiers import (
    SMALL_DIM,
    TOPK_METHODS,
    Identity,
    PermK,
    RandK,
    TopK,
    is_permk_block,
    permk_block,
    randk_indices,
    topk_indices,
)
from byzps.common.sparse import SparseBatch

__all__ = [
    "COMPRESSORS",
    "QSGD",
    "SMALL_DIM",
    "TOPK_METHODS",
    "VALUE_DTYPES",
    "Compressor",
    "Identity",
    "Natural",
    "NaturalDithering",
    "PermK",
    "Quantizer",
    "RandK",
    "ScaledSign",
    "TopK",
    "build_compressor",
    "cast_values",
    "check_layer_sizes",
    "dense_batch",
    "is_permk_block",
    "permk_block",
    "randk_indices",
    "resolve_k",
    "topk_indices",
]


def dense_batch(z: Tensor) -> SparseBatch:
    """Rows of `z` as a SparseBatch with nnz = d (MARINA's full rounds are dense by design)."""
    return Identity(z.shape[1]).compress(z)


def build_compressor(
    name: str,
    dim: int,
    layer_sizes: Sequence[int] | None = None,
    num_workers: int | None = None,
    **params: Any,
) -> Compressor:
    """Construct compressor `name` from configuration; bad parameters raise ValueError.

    `num_workers` (the run's n) goes to the compressors that take it (Perm-K) and is ignored by
    the rest."""
    supplied: dict[str, Any] = {"dim": dim, "layer_sizes": layer_sizes}
    accepted = inspect.signature(COMPRESSORS.get(name)).parameters
    if num_workers is not None and "num_workers" in accepted:
        supplied["num_workers"] = num_workers
    return COMPRESSORS.build(name, **supplied, **params)
