"""Sparsifiers: Top-k, Rand-k, Perm-K and identity keep some coordinates and send index/value pairs.

Top-k selection is the hot path of every worker, so it has five interchangeable implementations
that return identical indices (a test checks it): a one-pass compiled scan per row (the fastest on
CPU for large d, `_topk_scan`, falling back to the next where it cannot vouch for its answer),
numpy per row (np.partition threshold), numpy over the whole batch (argmax for k = 1, else one
batched partition; the fastest for small d, where a call's overhead is the cost), a stable torch
sort (the reference the others are checked against) and a torch threshold path for non-CPU
devices. Ties are always broken towards the lower index, which makes the selection a pure function
of z — the simulator and a gRPC worker send the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from byzps.common.compressors._feistel import keyed_permutation_at, keyed_positions_within
from byzps.common.compressors._permutation import randperm_head
from byzps.common.compressors._topk_scan import scan_row
from byzps.common.compressors.base import (
    COMPRESSORS,
    Compressor,
    check_int,
    check_layer_sizes,
    resolve_k,
)
from byzps.common.seeding import derive_seed
from byzps.common.sparse import INDEX_DTYPE, SparseBatch, dense_indices

#: Up to this many coordinates one selection over the whole (w, d) batch beats per-row partition.
SMALL_DIM = 4096
TOPK_METHODS = ("auto", "scan", "numpy", "select", "sort", "torch")
#: dtypes the scan is compiled for; others take the partition path.
_SCAN_DTYPES = (torch.float32, torch.float64)


def _scannable(z: Tensor) -> bool:
    """Rows the scan can read in place: CPU float32/float64."""
    return z.device.type == "cpu" and z.dtype in _SCAN_DTYPES


# ----------------------------------------------------------------------------------------------
# Top-k selection: k largest |z| per row, ties to the lower index, indices ascending
# ----------------------------------------------------------------------------------------------


def _topk_numpy(z: Tensor, k: int) -> Tensor:
    """Threshold t = k-th largest |z| per row via np.partition, then flatnonzero (already sorted).

    O(d) per row instead of torch.topk's heap. Rows are processed one at a time: a 4 MB row stays
    in cache across abs, partition and compare, which measured ~1.5× faster than one batched
    partition over (w, d). A row with more than k entries ≥ t (ties at t) drops its highest-index
    ties. A row holding NaN (an honest worker's only on a diverged run) takes the stable sort,
    which ranks NaN below every number as every other path does: the message then carries NaN
    only when fewer than k numbers are left, and the door refuses it (the run diverged).
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
        elif idx.size < k:  # NaN compares false with t
            idx = _topk_sort(torch.from_numpy(rows[r]).unsqueeze(0), k)[0].numpy()
        out[r] = idx
    return torch.from_numpy(out)


def _scan_rows(a: Tensor, b: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """(w, k) indices and values of the Top-k of each row of a − b (of a when b is None), by the
    one-pass scan; a row it cannot vouch for (NaN, a misleading sample) by `_topk_numpy`, on the
    difference materialised for that row alone. CPU float32/float64 rows only."""
    rows = a.detach().numpy()
    subtrahends = None if b is None else b.detach().numpy()
    w = rows.shape[0]
    indices = np.empty((w, k), np.int32)
    values = np.empty((w, k), rows.dtype)
    for r in range(w):
        minus = None if subtrahends is None else subtrahends[r]
        found = scan_row(rows[r], minus, k)
        if found is None:
            z = rows[r] if minus is None else rows[r] - minus
            chosen = _topk_numpy(torch.from_numpy(z).unsqueeze(0), k)[0].numpy()
            found = chosen, z[chosen]
        indices[r], values[r] = found
    return torch.from_numpy(indices), torch.from_numpy(values)


def _topk_select(z: Tensor, k: int) -> Tensor:
    """One numpy selection over the whole (w, d) batch: argmax for k = 1 (its first maximum is
    the lowest index among ties), else the k-th largest |z| of each row from one batched
    np.partition and the tie rule of `_topk_torch`. ~20x faster than the stable sort at a9a's
    (12, 123), where the sort itself, not Python, was the cost.

    argmax and partition rank NaN above every number, the stable sort of −|z| below; a batch
    holding NaN (an honest worker's only on a diverged run) goes to `_topk_sort`, so that this
    path, which "auto" takes on CPU, selects what it did before it existed, NaN or not.
    """
    zz = z.detach().cpu()
    if zz.dtype not in (torch.float32, torch.float64):
        zz = zz.float()  # exact for float16 / bfloat16: same order of magnitudes
    a = np.abs(zz.numpy())
    w, d = a.shape
    if k == 1:
        best = a.argmax(axis=1)
        if np.isnan(a[np.arange(w), best]).any():  # argmax stops at a row's first NaN
            return _topk_sort(z, k)
        return torch.from_numpy(best.astype(np.int32).reshape(w, 1)).to(z.device)
    if np.isnan(a).any():
        return _topk_sort(z, k)
    t = np.partition(a, d - k, axis=1)[:, d - k : d - k + 1]
    above = a > t
    tied = a == t
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
    columns = np.nonzero(keep)[1]  # row-major: each row's k columns, ascending
    return torch.from_numpy(columns.astype(np.int32).reshape(w, k)).to(z.device)


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
    if int(keep.sum()) != w * k:  # NaN compares false with t: rank it as the sort does
        return _topk_sort(z, k)
    return keep.nonzero()[:, 1].reshape(w, k).to(INDEX_DTYPE)


def topk_indices(z: Tensor, k: int, method: str = "auto") -> Tensor:
    """(w, k) int32 indices of the k largest |z| per row, ascending; ties go to the lower index.

    `method` picks the implementation ("auto": for d ≤ SMALL_DIM select on CPU, sort on other
    devices; above it the scan on CPU — numpy for dtypes it is not compiled for — and torch on
    other devices); all return the same indices.
    """
    if method not in TOPK_METHODS:
        raise ValueError(f"method must be one of {TOPK_METHODS}, got {method!r}")
    d = z.shape[1]
    if k == d:
        return dense_indices(z.shape[0], d, z.device)
    if method == "auto":
        on_cpu = z.device.type == "cpu"
        if d <= SMALL_DIM:
            method = "select" if on_cpu else "sort"
        else:
            method = "scan" if on_cpu else "torch"
    if method == "scan" and _scannable(z):
        return _scan_rows(z, None, k)[0]
    if method in ("scan", "numpy"):  # the scan's fallback for what it is not compiled for
        return _topk_numpy(z, k).to(z.device)
    if method == "select":
        return _topk_select(z, k)
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
        values: str = "float32",
    ) -> None:
        super().__init__(dim, values)
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

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del seeds, workers  # deterministic
        return self._select(z, None)

    def _compress_difference(
        self, a: Tensor, b: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del seeds, workers
        return self._select(a, b)

    def _select(self, a: Tensor, b: Tensor | None) -> SparseBatch:
        """Top-k of a − b (of a when b is None): by the scan, which reads a and b once and makes
        no d-sized buffer, wherever `topk_indices` would take it; else on the difference."""
        scans = (
            self.scope == "global"
            and self.method in ("auto", "scan")
            and _scannable(a)
            and (b is None or b.dtype == a.dtype)
            and self.dim > SMALL_DIM
            and self._k < self.dim
        )
        if scans:
            indices, values = _scan_rows(a, b, self._k)
            return SparseBatch(indices, values, self.dim)
        z = a if b is None else a - b
        indices = self.indices(z)
        return SparseBatch(indices, _gather(z, indices), self.dim)


# ----------------------------------------------------------------------------------------------
# Rand-k
# ----------------------------------------------------------------------------------------------


def randk_indices(dim: int, k: int, seed: int, device: str | torch.device = "cpu") -> Tensor:
    """The k coordinates (ascending, int32) that Rand-k draws for `seed`: the first k of the
    seed's permutation of the d coordinates (torch.randperm's, on a CPU generator, so every
    device agrees). A server regenerates them from the seed in a message to check it, in O(k):
    `_permutation.randperm_head`."""
    idx = randperm_head(dim, k, seed)
    return torch.sort(idx).values.to(device=device, dtype=INDEX_DTYPE)


@COMPRESSORS.register("randk")
class RandK(Compressor):
    """Rand-k: Q(z) keeps k seeded uniformly drawn coordinates scaled by d/k (E[Q(z)] = z,
    ω = d/k − 1). The seed of each row travels in the batch so the receiver can regenerate it."""

    unbiased = True
    seeded = True

    def __init__(
        self,
        dim: int,
        *,
        k: int | None = None,
        ratio: float | None = None,
        layer_sizes: Sequence[int] | None = None,
        values: str = "float32",
    ) -> None:
        super().__init__(dim, values)
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

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del workers
        assert seeds is not None  # checked by compress
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

    unbiased = True

    def __init__(
        self,
        dim: int,
        *,
        layer_sizes: Sequence[int] | None = None,
        values: str = "float32",
    ) -> None:
        super().__init__(dim, values)
        self.layer_sizes = check_layer_sizes(dim, layer_sizes)

    @property
    def k(self) -> int:
        return self.dim

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del seeds, workers
        idx = dense_indices(z.shape[0], self.dim, z.device)
        return SparseBatch(idx, z.detach().clone(), self.dim)


def dense_batch(z: Tensor) -> SparseBatch:
    """Rows of `z` as a SparseBatch with nnz = d (MARINA's full rounds are dense by design)."""
    return Identity(z.shape[1]).compress(z)


# ----------------------------------------------------------------------------------------------
# Perm-K
# ----------------------------------------------------------------------------------------------


#: Up to this many coordinates Perm-K's permutation is the seed's torch.randperm, drawn whole
#: (≤ 0.1 ms); above it, the keyed Feistel permutation (`_feistel`), evaluated at the block's
#: positions only. Below it the Feistel's half-words are too short to mix well (at d = 5 the
#: first position's value failed a χ² test of uniformity over 20,000 seeds, p < 0.001).
SHUFFLED_DIM = 4096


def _permk_span(dim: int, num_workers: int, worker: int) -> tuple[int, int]:
    """(start, k): worker `worker`'s first position in Perm-K's permutation and its block size
    k = ⌈d/n⌉ (the worker index taken mod n)."""
    k = -(-dim // num_workers)
    return (int(worker) % num_workers) * k, k


def permk_block(dim: int, num_workers: int, seed: int, worker: int) -> Tensor:
    """Worker `worker`'s coordinates (ascending, int32) under Perm-K's shared permutation π of
    `seed`: π at positions worker·k … worker·k + k − 1, read cyclically, with k = ⌈d/n⌉ and the
    worker index taken mod n. A server regenerates them to check a message, in O(k) (O(d) with
    d at most SHUFFLED_DIM)."""
    start, k = _permk_span(dim, num_workers, worker)
    positions = np.arange(start, start + k, dtype=np.int64) % dim
    if dim <= SHUFFLED_DIM:
        values = randperm_head(dim, dim, seed).numpy()[positions]
    else:
        values = keyed_permutation_at(dim, seed, positions)
    return torch.from_numpy(np.sort(values).astype(np.int32))


def is_permk_block(indices: Tensor, dim: int, num_workers: int, seed: int, worker: int) -> bool:
    """Whether `indices` (strictly increasing, as every decoded message's are) is
    `permk_block(dim, num_workers, seed, worker)`. Above SHUFFLED_DIM it asks π⁻¹ of each index
    instead of building and sorting the block: a server's check at the cost of one pass (k
    distinct indices that all sit in the worker's k positions are its block)."""
    start, k = _permk_span(dim, num_workers, worker)
    if indices.numel() != k:
        return False
    if dim <= SHUFFLED_DIM:
        return torch.equal(indices, permk_block(dim, num_workers, seed, worker))
    return keyed_positions_within(dim, seed, indices.numpy(), start, k)


@COMPRESSORS.register("permk")
class PermK(Compressor):
    r"""Perm-K (Szlendak, Tyurin, Richtárik, "Permutation compressors for provably faster
    distributed nonconvex optimization", ICLR 2022): one random permutation π of the d
    coordinates per round (pseudorandom: see `permk_block`), shared by all n workers; worker i
    keeps its block B_i = {π(ik), …, π(ik + k − 1)} (positions read cyclically), k = ⌈d/n⌉,
    scaled by d/k:

    .. math::
        Q_i(z) = \frac{d}{k} \sum_{j \in B_i} z_j e_j .

    Unbiased: coordinate j lies in B_i with probability k/d, so E[Q_i(z)] = z and
    E‖Q_i(z) − z‖² = Σ_j (k/d · (d/k)² − 1) z_j² = (d/k − 1)‖z‖², i.e. ω = d/k − 1 (= n − 1 when
    n divides d). The blocks are disjoint when n divides d, and then the average of the n
    messages of one common z is exactly z — the correlation that makes Perm-K beat Rand-k in
    Szlendak et al. The server rules and estimators use only the individual ω (a worker's
    message is judged on its own: the aggregator is robust, not an average), so DIANA's and
    MARINA's defaults are the safe, uncorrelated ones.

    The shared seed is derive_seed(run seed, "permk", round) (`round_seed`), the same for every
    row; it travels in each message, and the server refuses a message whose seed is not its
    round's or whose indices are not the block of the sender's worker id (its row).
    """

    unbiased = True
    seeded = True

    def __init__(
        self,
        dim: int,
        *,
        num_workers: int = 1,
        layer_sizes: Sequence[int] | None = None,
        values: str = "float32",
    ) -> None:
        super().__init__(dim, values)
        self.layer_sizes = check_layer_sizes(dim, layer_sizes)
        self.num_workers = check_int("num_workers", num_workers, 1, 2**31 - 1)
        self._k = -(-dim // self.num_workers)

    @property
    def k(self) -> int:
        return self._k

    @classmethod
    def round_seed(cls, seed: int, round: int) -> int:
        """The seed of the permutation every worker of run `seed` shares in `round`."""
        return derive_seed(seed, cls.name, round)

    def row_seeds(self, seed: int, worker_ids: Sequence[int], round: int) -> tuple[int, ...]:
        """One permutation per round shared by every worker: the same seed in every row."""
        return (self.round_seed(seed, round),) * len(worker_ids)

    def indices_for(self, seed: int, worker: int) -> Tensor:
        return permk_block(self.dim, self.num_workers, seed, worker)

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        assert seeds is not None  # checked by compress
        if workers is None or len(workers) != z.shape[0]:
            raise ValueError(f"workers: Perm-K needs the worker id of each row ({z.shape[0]})")
        seeds = tuple(int(s) for s in seeds)
        idx = torch.stack(
            [self.indices_for(s, w).to(z.device) for s, w in zip(seeds, workers, strict=True)]
        )
        values = _gather(z, idx) * (self.dim / self._k)
        return SparseBatch(idx, values, self.dim, seeds)
