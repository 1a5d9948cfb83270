"""Task "quadratic": heterogeneous separable quadratics of any dimension, generated from the seed.

Worker i holds  f_i(x) = ½ Σ_t h_t (x_t − b_{i,t})²  and the objective is f = (1/n) Σ_i f_i.
Why this task exists: the paper's tasks fix d (123 for a9a, ~3e4 for the CNN), but the
system's costs — the broadcast, the aggregation, the wire — are functions of d. A quadratic
whose d is a parameter lets the real cluster run at d = 1e6 or 1e7 with the real estimators,
and it has a closed-form optimum, so a run's optimality gap is exact.

- Curvatures h_t are log-uniform in [mu, L] (shared by all workers, condition number L/mu).
- Targets b_i = b̄ + heterogeneity · ζ_i with b̄, ζ_i ~ N(0, I): heterogeneity sets how far the
  workers' optima lie apart (0 = identical workers).
- A stochastic gradient is  h ⊙ (x − b_i) + (noise / √batch_size) · ξ_{i,t},  ξ ~ N(0, I) drawn
  from a generator keyed by (seed, worker, round): a pure function of those three, so a worker
  daemon draws exactly the noise the simulator draws for it, and a VR estimator evaluating the
  same mini-batch at two points sees the same ξ.
- The optimum is x* = m = mean_i b_i, with f* = ½ Σ_t h_t · var_i(b_{i,t}).
- The label-flip attack has no labels to flip here; `flip_labels` negates the targets
  (b_i → −b_i), the quadratic's analogue of training towards the wrong answer.

Every vector is generated from the seed on demand, so a worker process materialises only its own
targets (4·d bytes each), not all n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from byzps.common.seeding import generator
from byzps.common.tasks.base import TASKS, Task
from byzps.common.tasks.spec import DataSpec


@dataclass(frozen=True)
class NoiseDraw:
    """The 'mini-batch' of a quadratic round: which noise vectors ξ_{i,t} to add."""

    round: int


class QuadraticOracle:
    """Gradients of the f_i of the given worker rows (targets materialised for those rows only).

    Rows may belong to several runs (`stack`): each row then carries its own run's seed and
    curvature, and `grad` takes one model per row.
    """

    def __init__(
        self,
        targets: Tensor,
        curvature: Tensor,
        workers: Sequence[int],
        seeds: Sequence[int],
        noise_scale: float,
    ) -> None:
        self.num_workers, self.dim = targets.shape
        self.workers = [int(w) for w in workers]
        self.seeds = [int(s) for s in seeds]
        self.curvature = curvature
        self.targets = targets
        self.noise_scale = noise_scale

    @classmethod
    def of_task(
        cls, task: QuadraticTask, workers: Sequence[int], seed: int, flip_targets: bool
    ) -> QuadraticOracle:
        sign = -1.0 if flip_targets else 1.0
        targets = torch.stack([task.target(i) for i in workers]).mul_(sign)
        noise_scale = task.noise / math.sqrt(task.batch_size)
        return cls(targets, task.curvature, workers, [seed] * len(workers), noise_scale)

    @classmethod
    def stack(cls, oracles: Sequence[QuadraticOracle]) -> QuadraticOracle:
        """One oracle over the rows of `oracles` (the workers of several runs), each row
        computing exactly what it did alone; curvatures are kept per row when runs differ."""
        if len({o.noise_scale for o in oracles}) != 1:
            raise ValueError("stacked oracles must share their noise scale")
        first = oracles[0].curvature
        if all(torch.equal(o.curvature, first) for o in oracles):
            curvature = first
        else:
            curvature = torch.cat([o.curvature.expand(o.num_workers, o.dim) for o in oracles])
        return cls(
            torch.cat([o.targets for o in oracles]),
            curvature,
            [w for o in oracles for w in o.workers],
            [s for o in oracles for s in o.seeds],
            oracles[0].noise_scale,
        )

    def sample(self, round: int) -> NoiseDraw:
        return NoiseDraw(round)

    def full_grad(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """(w, d): h ⊙ (x − b_i); x is shared (d,) or one per row (w, d). Written into `out`
        when it is an earlier result of this oracle's shape and dtype (see GradientOracle.grad)."""
        fresh = out is None or out.shape != self.targets.shape
        if fresh or out.dtype != torch.result_type(x, self.targets):
            return (x - self.targets).mul_(self.curvature)
        return torch.sub(x, self.targets, out=out).mul_(self.curvature)

    def grad(self, x: Tensor, batch: NoiseDraw, out: Tensor | None = None) -> Tensor:
        grads = self.full_grad(x, out)
        if self.noise_scale > 0:
            for row, (worker, seed) in enumerate(zip(self.workers, self.seeds, strict=True)):
                noise = torch.randn(
                    self.dim, generator=generator(seed, "quadratic-noise", worker, batch.round)
                )
                grads[row].add_(noise, alpha=self.noise_scale)
        return grads


@TASKS.register("quadratic")
class QuadraticTask(Task):
    """Separable heterogeneous quadratics of dimension `dim` (see the module doc)."""

    #: Its oracle draws the gradient noise on the CPU generator of each call.
    movable = False

    num_classes = 2
    stacks_oracles = True
    analytic_gradients = True

    def __init__(
        self,
        *,
        data: DataSpec,
        dim: int = 100_000,
        heterogeneity: float = 1.0,
        noise: float = 1.0,
        mu: float = 0.1,
        L: float = 1.0,
    ) -> None:
        """`data.split`, `split_over` and `sampling` describe how rows are dealt out and drawn in
        data tasks; here heterogeneity and the keyed noise play those roles, so only their
        defaults are accepted (every worker id, Byzantine ones too, has its own target)."""
        for key, value, default in (
            ("split", data.split, "iid"),
            ("split_over", data.split_over, "all"),
            ("sampling", data.sampling, "replace"),
        ):
            if value != default:
                raise ValueError(
                    f"quadratic has no data rows; {key} must be {default!r}, got {value!r}"
                )
        checks = (
            (dim >= 1, f"dim must be >= 1, got {dim}"),
            (heterogeneity >= 0, f"heterogeneity must be >= 0, got {heterogeneity}"),
            (noise >= 0, f"noise must be >= 0, got {noise}"),
            (0 < mu <= L, f"need 0 < mu <= L, got mu = {mu}, L = {L}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        num_workers, seed = data.num_workers, data.seed
        self.data = data
        self.num_workers = num_workers
        self.seed = seed
        self.batch_size = data.batch_size
        self._dim = dim
        self.heterogeneity = heterogeneity
        self.noise = noise
        log_h = torch.empty(dim).uniform_(
            math.log(mu), math.log(L), generator=generator(seed, "quadratic", "curvature")
        )
        self.curvature = log_h.exp_()
        self._center = torch.randn(dim, generator=generator(seed, "quadratic", "center"))
        self._optimum: tuple[Tensor, float] | None = None

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self._dim,)

    def init_params(self, seed: int) -> Tensor:
        """x⁰ = 0 (independent of the seed, like a9a)."""
        return torch.zeros(self._dim)

    def target(self, worker: int) -> Tensor:
        """b_i = b̄ + heterogeneity · ζ_i, regenerated from the seed on every call."""
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker id {worker} outside [0, {self.num_workers})")
        zeta = torch.randn(self._dim, generator=generator(self.seed, "quadratic", "target", worker))
        return zeta.mul_(self.heterogeneity).add_(self._center)

    def oracle(
        self, workers: Sequence[int], seed: int, *, flip_labels: bool = False
    ) -> QuadraticOracle:
        ids = list(workers)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"need distinct worker ids, got {ids}")
        return QuadraticOracle.of_task(self, ids, seed, flip_labels)

    def optimum(self) -> tuple[Tensor, float]:
        """(x*, f*): the mean target and ½ Σ h · var_i(b_i), accumulated in float64 over the
        workers one at a time (O(d) memory whatever n is)."""
        if self._optimum is None:
            total = torch.zeros(self._dim, dtype=torch.float64)
            squares = torch.zeros(self._dim, dtype=torch.float64)
            for i in range(self.num_workers):
                b = self.target(i).double()
                total += b
                squares += b * b
            mean = total / self.num_workers
            variance = (squares / self.num_workers - mean * mean).clamp_(min=0)
            f_star = 0.5 * float((self.curvature.double() * variance).sum())
            self._optimum = (mean, f_star)
        return self._optimum

    def evaluate(self, x: Tensor) -> dict[str, float]:
        """train_loss f(x), grad_norm_sq ‖∇f(x)‖² and loss_gap f(x) − f* (all exact)."""
        mean, f_star = self.optimum()
        h = self.curvature.double()
        diff = x.double() - mean
        gap = 0.5 * float((h * diff * diff).sum())
        return {
            "train_loss": f_star + gap,
            "grad_norm_sq": float(((h * diff) ** 2).sum()),
            "loss_gap": gap,
        }
