"""How a sharded parameter server divides the model: S shards, each owning one contiguous range
of the d coordinates — of x, of ĝ and of every worker's error-feedback state.

Why contiguous ranges: a worker splits each sparse message by one binary search over its sorted
indices (no per-entry hashing), a shard's slice of x is one memcpy, and the model's layout stays
the worker's own. Ranges are as even as d allows (the first d mod S shards hold one more).

Who may be sharded: every compressor whose messages are (index, value) pairs — Top-k, Rand-k
and the identity (MARINA's and PAGE's dense rounds among them). A packed quantizer (QSGD,
natural, sign, natural dithering) sends one code with one scale for the whole vector, and a
Perm-K block is checked against its worker's whole permutation, so neither splits into
independently checkable parts; `check_shardable` refuses them by name.

On the wire a shard is an ordinary server whose model is its slice: an update pushed to it has
`dim` = the shard's width and indices local to it (global − offset), and its model and deltas
are the slice's. `ShardRange` carries what a shard's door needs beyond that: where the slice
lies in the whole (Rand-k's selection is drawn over all d coordinates and must be checked there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from byzps.common.codec import INDEX_BYTES
from byzps.common.config import ConfigError
from byzps.proto.v1 import parameter_server_pb2 as pb

#: Compressors whose messages split into independent per-shard messages.
SHARDABLE_COMPRESSORS = frozenset({"topk", "randk", "identity"})


class ShardingError(ConfigError):
    """A message or configuration that cannot be split over shards (the text says why; a
    ConfigError, so the CLI reports a refused config like any other)."""


def check_shardable(compressor: str, shards: int) -> None:
    """Raise ShardingError (naming cluster.shards) when `compressor`'s messages cannot be split."""
    if shards > 1 and compressor not in SHARDABLE_COMPRESSORS:
        raise ShardingError(
            f"cluster.shards: {compressor} messages do not split by coordinates (one packed code "
            f"or one permutation per vector); sharding supports {sorted(SHARDABLE_COMPRESSORS)}"
        )


@dataclass(frozen=True)
class ShardRange:
    """Shard `rank` of `count`: global coordinates [offset, offset + width) of `total`."""

    rank: int
    count: int
    offset: int
    width: int
    total: int

    @property
    def end(self) -> int:
        return self.offset + self.width

    @property
    def whole(self) -> bool:
        """An unsharded server: one shard holding every coordinate."""
        return self.count == 1

    def info(self) -> pb.ShardInfo:
        return pb.ShardInfo(
            rank=self.rank, count=self.count, offset=self.offset, total_dim=self.total
        )


@dataclass(frozen=True)
class ShardLayout:
    """The S contiguous coordinate ranges of a d-dimensional model."""

    dim: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardingError(f"cluster.shards: must be at least 1, got {self.count}")
        if self.count > self.dim:
            raise ShardingError(
                f"cluster.shards: {self.count} shards for a model of only {self.dim} coordinates"
            )

    @property
    def bounds(self) -> np.ndarray:
        """(S + 1,) int64: shard s owns [bounds[s], bounds[s + 1])."""
        base, extra = divmod(self.dim, self.count)
        widths = np.full(self.count, base, np.int64)
        widths[:extra] += 1
        return np.concatenate([[0], np.cumsum(widths)])

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in np.diff(self.bounds)]

    def shard(self, rank: int) -> ShardRange:
        if not 0 <= rank < self.count:
            raise ShardingError(f"shard rank {rank} outside [0, {self.count})")
        lo, hi = self.bounds[rank : rank + 2]
        return ShardRange(rank, self.count, int(lo), int(hi - lo), self.dim)

    def split(self, update: pb.SparseUpdate) -> list[pb.SparseUpdate]:
        """One message per shard, in rank order: each carries the entries in its range, with
        local indices and dim = its width; the compressor, value dtype and seed are kept. A
        dense update stays dense on every shard (no index bytes).

        Only the layout is checked here (dim, byte lengths, sorted indices), enough to cut the
        message where a shard's door will look for it; ShardingError otherwise, or for a packed
        update. Everything else is each shard's door's to check."""
        if update.dim != self.dim:
            raise ShardingError(f"dim {update.dim} is not the sharded model's {self.dim}")
        if update.packed:
            raise ShardingError("a packed update does not split by coordinates")
        nnz, raw_values, raw_indices = update.nnz, update.values, update.indices
        if (nnz == 0) != (not raw_values) or (nnz and len(raw_values) % nnz):
            raise ShardingError(f"{len(raw_values)} value bytes for nnz {nnz}")
        itemsize = len(raw_values) // nnz if nnz else 0
        bounds = self.bounds
        indices: np.ndarray | None = None
        if nnz == update.dim and not raw_indices:
            cuts = bounds
        else:
            if len(raw_indices) != INDEX_BYTES * nnz:
                raise ShardingError(f"{len(raw_indices)} index bytes for nnz {nnz}")
            indices = np.frombuffer(raw_indices, dtype="<u4")
            if nnz > 1 and bool((indices[1:] <= indices[:-1]).any()):
                raise ShardingError("indices are not strictly increasing")
            cuts = np.searchsorted(indices, bounds)
        parts = []
        for s in range(self.count):
            a, b = int(cuts[s]), int(cuts[s + 1])
            part = pb.SparseUpdate(
                dim=int(bounds[s + 1] - bounds[s]),
                nnz=b - a,
                dtype=update.dtype,
                compressor=update.compressor,
                values=raw_values[a * itemsize : b * itemsize],
            )
            if indices is not None and b > a:
                part.indices = (indices[a:b] - np.uint32(bounds[s])).astype("<u4").tobytes()
            if update.HasField("seed"):
                part.seed = update.seed
            parts.append(part)
        return parts


def join_slices(slices: Sequence[np.ndarray]) -> np.ndarray:
    """The whole vector from its shards' slices, in rank order."""
    return np.concatenate(list(slices))
