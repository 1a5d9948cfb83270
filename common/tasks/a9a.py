"""Task "a9a-logreg": logistic regression without bias on LIBSVM a9a (the paper's convex task).

Rows are L2-normalised and labels mapped from {−1, +1} to {0, 1}; the objective is the mean binary
cross-entropy plus a regulariser ("l2" or "nonconvex", see regularizers.py). Gradients are
analytic and batched over workers — this oracle is the simulator's hot path.

The global objective f (`loss`, `full_gradient`, evaluate's train_loss / grad_norm_sq) is the mean
over ALL training rows. `loss(x, workers)` is instead (1/|S|) Σ_{i∈S} f_i, the mean of the listed
workers' shard objectives (e.g. the honest workers'), which differs slightly when shards differ
in size.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from byzps.common.tasks.base import TASKS
from byzps.common.tasks.libsvm import parse_libsvm
from byzps.common.tasks.regularizers import Regularizer
from byzps.common.tasks.sampling import Batches
from byzps.common.tasks.sharded import ShardedTask
from byzps.common.tasks.spec import DataSpec

N_FEATURES = 123
_FILES = {"train": "a9a", "test": "a9a.t"}


def packaged_file(split: str) -> importlib.resources.abc.Traversable:
    """The gzipped LIBSVM file shipped as package data (byzps/common/data/<name>.gz)."""
    return importlib.resources.files("byzps.common") / "data" / f"{_FILES[split]}.gz"


@functools.cache
def load_a9a(split: str = "train") -> tuple[Tensor, Tensor]:
    """(features float32 (N, 123) with unit-norm rows, labels float32 in {0, 1}).

    Parsed once per process and shared: callers must not modify the tensors in place.
    """
    if split not in _FILES:
        raise ValueError(f"a9a split must be 'train' or 'test', got {split!r}")
    with packaged_file(split).open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as text:
        features, labels = parse_libsvm(text, N_FEATURES, source=_FILES[split])
    features /= features.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return features, (labels > 0).to(torch.float32)


def weighted_logistic(
    x: Tensor, features: Tensor, labels: Tensor, weights: Tensor | float, reg: Regularizer
) -> tuple[Tensor, Tensor]:
    """(Σ_j w_j ℓ_j(x) + r(x), its gradient) with ℓ_j the BCE of row j; weights sum to 1."""
    z = features @ x
    loss = (weights * (F.softplus(z) - labels * z)).sum() + reg.value(x)
    grad = features.T @ (weights * (torch.sigmoid(z) - labels)) + reg.grad(x)
    return loss, grad


@functools.cache
def train_float64() -> tuple[Tensor, Tensor]:
    """The training data in float64, once per process (32 MB, shared by every task and f*):
    `loss_gap`s of 1e-6 are below the rounding of a float32 sum over 32 561 rows."""
    features, labels = load_a9a("train")
    return features.to(torch.float64), labels.to(torch.float64)


def logistic_hessian(x: Tensor, features: Tensor, weight: float, reg: Regularizer) -> Tensor:
    """∇² of `weighted_logistic` with every row weighted `weight`: Aᵀ diag(w p(1 − p)) A plus
    the regulariser's (diagonal) curvature."""
    p = torch.sigmoid(features @ x)
    hessian = features.T @ (features * (weight * p * (1.0 - p))[:, None])
    return hessian + torch.diag(reg.curvature(x))


@functools.cache
def l2_optimum(lam: float) -> float:
    """f* of the L2-regularised objective over all training rows (λ = `lam` > 0), in float64.

    Why Newton and not a first-order solver: the objective is strongly convex (λ > 0) and
    d = 123, so each step is one (d, d) solve and the iteration converges quadratically; ten or
    so steps reach ‖∇f‖ ≈ 1e-15, far below any gap a run can resolve. Cached per process: every
    evaluation's `loss_gap` is f(x) − f*, and a sweep builds many tasks.
    """
    if lam <= 0:
        raise ValueError(f"the L2 objective is strongly convex only for lam > 0, got {lam}")
    features, labels = train_float64()
    weight = 1.0 / len(labels)
    x = torch.zeros(N_FEATURES, dtype=torch.float64)
    reg = Regularizer("l2", lam)
    for _ in range(50):
        loss, grad = weighted_logistic(x, features, labels, weight, reg)
        if float(grad.norm()) <= 1e-13:
            return float(loss)
        x = x - torch.linalg.solve(logistic_hessian(x, features, weight, reg), grad)
    raise RuntimeError("Newton's method did not converge on the a9a L2 objective")


#: Elements per iteration of torch's vectorised CPU loop, at most (2 × 16 floats, AVX-512).
_VECTOR_BLOCK = 32


def _row_sigmoid(z: Tensor) -> Tensor:
    """σ(z) for a (w, b) z, each row's bits independent of w.

    torch computes σ with a vectorised exp on whole blocks and a scalar one on the tail, and the
    two differ in the last bit; which elements fall in the tail depends on the tensor's length,
    so a worker's gradient would change with the number of rows computed beside it (a batched
    simulation's runs). Padding every row to whole blocks puts every element in the vectorised
    path, whatever w is.
    """
    w, b = z.shape
    width = -(-b // _VECTOR_BLOCK) * _VECTOR_BLOCK
    padded = z.new_zeros(w, width)
    padded[:, :b] = z
    return padded.sigmoid_()[:, :b]


def _weighted_rows(residual: Tensor, rows: Tensor) -> Tensor:
    """(w, d): Σ_j residual[i, j] · rows[i, j] for each worker i (rows (w, b, d)). With one row
    per worker (the paper's batch 1) a plain product, the same bits as the bmm's one-term sum:
    that bmm computes w separate 1 × d products, 126 µs at w = 192 (a batched simulation's
    honest rows) against 7 µs for the product."""
    if rows.shape[1] == 1:
        return rows.squeeze(1) * residual
    return _bmm_weighted_rows(residual, rows)


def _bmm_weighted_rows(residual: Tensor, rows: Tensor) -> Tensor:
    return torch.bmm(residual.unsqueeze(1), rows).squeeze(1)


class LogisticOracle:
    """Stochastic and full shard gradients of the regularised BCE for w workers at once."""

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        shards: Sequence[Tensor],
        batches: Batches,
        reg: Regularizer,
    ) -> None:
        self.num_workers = len(shards)
        self.dim = features.shape[1]
        self._features = features
        self._labels = labels
        self._shards = list(shards)
        self._batches = batches
        self._reg = reg
        #: The oracles this one stacks (`stack`), whose full gradients it computes part by part.
        self._parts: list[LogisticOracle] = []

    @classmethod
    def stack(cls, oracles: Sequence[LogisticOracle]) -> LogisticOracle:
        """One oracle over the rows of `oracles` (the workers of several runs on the same data,
        labels and regulariser), each row drawing and computing exactly what it did alone."""
        first = oracles[0]
        if any(o._reg != first._reg or not torch.equal(o._labels, first._labels) for o in oracles):
            raise ValueError("stacked oracles must share their labels and regulariser")
        stacked = cls(
            first._features,
            first._labels,
            [shard for o in oracles for shard in o._shards],
            type(first._batches).stack([o._batches for o in oracles]),
            first._reg,
        )
        stacked._parts = list(oracles)
        return stacked

    def sample(self, round: int) -> Tensor:
        return self._batches.sample(round)

    def _per_row(self, x: Tensor) -> Tensor:
        """x as (w, d): a shared model (d,) is broadcast, a stacked oracle's rows each bring
        their own run's. Both go through the same batched products below, so a row's gradient
        has the same bits whether its run is simulated alone or with others."""
        if x.dim() == 1:
            return x.expand(self.num_workers, self.dim)
        if x.shape != (self.num_workers, self.dim):
            raise ValueError(f"x has shape {tuple(x.shape)}, expected ({self.dim},) or "
                             f"({self.num_workers}, {self.dim})")  # fmt: skip
        return x

    def grad(self, x: Tensor, batch: Tensor, out: Tensor | None = None) -> Tensor:
        """(w, d): mean over each worker's batch row of (σ(aᵀx) − y) a, plus ∇r(x). `out` is
        ignored: at a9a's d the products allocate more than the result does."""
        xs = self._per_row(x)
        # index_select: a fraction of advanced indexing's cost here; it needs the index on the
        # data's device (batches are drawn on the CPU).
        flat = batch.reshape(-1).to(self._features.device)
        rows = self._features.index_select(0, flat).view(*batch.shape, self.dim)  # (w, b, d)
        residual = _row_sigmoid(torch.bmm(rows, xs.unsqueeze(2)).squeeze(2))  # (w, b)
        residual.sub_(self._labels.index_select(0, flat).view(batch.shape))
        grads = _weighted_rows(residual, rows)  # (w, d)
        return grads.mul_(1.0 / batch.shape[1]).add_(self._reg.grad(xs))

    @cached_property
    def _full(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every shard's rows gathered once into a zero-padded (w, m, d) block, with labels and
        per-row weights 1/|shard| (0 on padding): one bmm then gives all full gradients, where a
        scatter over the concatenated rows would write an (N, d) temporary every call."""
        longest = max(s.numel() for s in self._shards)
        rows = self._features.new_zeros(self.num_workers, longest, self.dim)
        labels = self._labels.new_zeros(self.num_workers, longest)
        weights = self._features.new_zeros(self.num_workers, longest)
        for i, shard in enumerate(self._shards):
            rows[i, : shard.numel()] = self._features[shard]
            labels[i, : shard.numel()] = self._labels[shard]
            weights[i, : shard.numel()] = 1.0 / shard.numel()
        return rows, labels, weights

    def full_grad(self, x: Tensor) -> Tensor:
        xs = self._per_row(x)
        if self._parts:
            # Each part pads its shards to its own longest one, as alone: the products' inner
            # length, and with it their rounding, must not depend on the other runs' shards.
            bounds = torch.tensor([0, *(o.num_workers for o in self._parts)]).cumsum(0).tolist()
            return torch.cat([
                part.full_grad(xs[start:end])
                for part, start, end in zip(self._parts, bounds, bounds[1:], strict=False)
            ])  # fmt: skip
        rows, labels, weights = self._full
        residual = torch.sigmoid(torch.bmm(rows, xs.unsqueeze(2)).squeeze(2))  # (w, m)
        residual.sub_(labels).mul_(weights)  # 0 on padding
        grads = _weighted_rows(residual, rows)
        return grads.add_(self._reg.grad(xs))


@TASKS.register("a9a-logreg")
class A9aLogRegTask(ShardedTask):
    """Logistic regression on a9a, its rows split among the run's workers (see the module doc)."""

    num_classes = 2
    stacks_oracles = True
    analytic_gradients = True

    def __init__(
        self,
        *,
        data: DataSpec,
        regularizer: str = "l2",
        lam: float | None = None,
        dtype: str = "float32",
    ) -> None:
        """`lam` defaults to the paper's λ for `regularizer`; `dtype` ("float32"/"float64") is
        the dtype of the data and of the x the oracle accepts (float64 serves exact checks)."""
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self.reg = Regularizer.named(regularizer, lam)
        features, labels = load_a9a("train")
        test_features, test_labels = load_a9a("test")
        self.features, self.labels = features.to(self.dtype), labels.to(self.dtype)
        self.test_features, self.test_labels = (
            test_features.to(self.dtype),
            test_labels.to(self.dtype),
        )
        super().__init__(labels, data)

    @property
    def dim(self) -> int:
        return N_FEATURES

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (N_FEATURES,)

    def init_params(self, seed: int) -> Tensor:
        """x⁰ = 0 (the paper's start; independent of the seed)."""
        return torch.zeros(N_FEATURES, dtype=self.dtype)

    def oracle(
        self, workers: Sequence[int], seed: int, *, flip_labels: bool = False
    ) -> LogisticOracle:
        labels = self.flipped(self.labels) if flip_labels else self.labels
        shards = self.worker_shards(workers)
        return LogisticOracle(self.features, labels, shards, self.sampler(workers, seed), self.reg)

    def _objective(self, x: Tensor, workers: Sequence[int] | None) -> tuple[Tensor, Tensor]:
        if workers is None:
            return weighted_logistic(
                x, self.features, self.labels, 1.0 / len(self.labels), self.reg
            )
        shards = self.worker_shards(workers)
        index = torch.cat(shards)
        weights = torch.cat([torch.full((len(s),), 1.0 / (len(s) * len(shards))) for s in shards])
        return weighted_logistic(
            x, self.features[index], self.labels[index], weights.to(x.device, self.dtype), self.reg
        )

    def loss(self, x: Tensor, workers: Sequence[int] | None = None) -> float:
        """The regularised objective at x: over all training rows, or the mean of `workers`' f_i."""
        return float(self._objective(x, workers)[0])

    def full_gradient(self, x: Tensor, workers: Sequence[int] | None = None) -> Tensor:
        """∇ of `loss(x, workers)`, shape (d,)."""
        return self._objective(x, workers)[1]

    def optimal_loss(self) -> float | None:
        """f* where it is known: the L2 objective (strongly convex) has one; the non-convex
        regulariser's global minimum is not computable, so None."""
        return l2_optimum(self.reg.lam) if self.reg.kind == "l2" and self.reg.lam > 0 else None

    def evaluate(self, x: Tensor) -> dict[str, float]:
        """train_loss and grad_norm_sq of the full regularised objective; test_loss (BCE only,
        without the regulariser) and test_accuracy (σ(aᵀx) > 1/2) on a9a.t; and, where f* is
        known (`optimal_loss`), loss_gap = f(x) − f* computed in float64."""
        x = x.to(self.dtype)
        loss, grad = self._objective(x, None)
        z = self.test_features @ x
        y = self.test_labels
        record = {
            "train_loss": float(loss),
            "grad_norm_sq": float(grad.square().sum()),
            "test_loss": float((F.softplus(z) - y * z).mean()),
            "test_accuracy": float(((z > 0).to(y.dtype) == y).to(torch.float64).mean()),
        }
        f_star = self.optimal_loss()
        if f_star is not None:
            features, labels = train_float64()
            loss64, _ = weighted_logistic(  # on the CPU, where the float64 copy is kept
                x.to("cpu", torch.float64), features, labels, 1.0 / len(labels), self.reg
            )
            record["loss_gap"] = float(loss64) - f_star
        return record
