"""Neural-network tasks over a flat parameter vector, with per-worker gradients via torch.func.

A `FunctionalModel` evaluates an nn.Module at a flat x ∈ R^d (torch.func.functional_call on views
of x, in named_parameters order), so the estimators, compressors and the wire only ever see flat
vectors. The oracle computes all w workers' mini-batch gradients in one call with
vmap(grad(loss)) over the worker axis: each worker has its own mini-batch, x is shared.
`vmap_chunk_size` trades memory and speed: on CPU, the batched convolution backward that a full
vmap produces is slower than small chunks (see the tasks' report), on an accelerator it is faster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from byzps.common.seeding import derive_seed, generator
from byzps.common.tasks.sampling import Batches
from byzps.common.tasks.sharded import ShardedTask
from byzps.common.tasks.spec import DataSpec

#: Rows per forward pass in full-data losses and gradients. It bounds activation memory, and its
#: size matters for speed: SmallCNN's first activations for 2 000 rows (73 MB) spill out of cache,
#: and the gradient over 6 000 rows on one thread took 2.85 s in chunks of 2 000 against 1.63 s
#: in chunks of 500 (1.72 s vs 1.07 s on two threads; chunks of 250 and 125 were no faster).
CHUNK = 500


class FunctionalModel:
    """An nn.Module architecture evaluated at flat parameter vectors."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self._factory = factory
        self._module = factory()  # a skeleton: its own parameters are never used
        params = list(self._module.named_parameters())
        self.names = tuple(name for name, _ in params)
        self.shapes = tuple(p.shape for _, p in params)
        self.layer_sizes = tuple(p.numel() for _, p in params)
        self.dim = sum(self.layer_sizes)

    def init_params(self, seed: int) -> Tensor:
        """PyTorch's default initialisation under a seeded, forked RNG (global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "init"))
            module = self._factory()
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def logits(self, x: Tensor, inputs: Tensor) -> Tensor:
        parts = zip(x.split(self.layer_sizes), self.shapes, strict=True)
        views = {name: t.view(shape) for name, (t, shape) in zip(self.names, parts, strict=True)}
        return functional_call(self._module, views, (inputs,))

    def mean_loss(self, x: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(x, inputs), targets)

    def loss_and_grad(self, x: Tensor, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over all rows and its gradient, in chunks of CHUNK rows."""
        x = x.detach().requires_grad_(True)
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        gradient = torch.zeros_like(x)
        for start in range(0, len(targets), CHUNK):
            part = slice(start, start + CHUNK)
            loss = F.cross_entropy(self.logits(x, inputs[part]), targets[part], reduction="sum")
            gradient += torch.autograd.grad(loss, x)[0]
            total += loss.detach()
        return total / len(targets), gradient / len(targets)

    @torch.no_grad()
    def loss_and_accuracy(self, x: Tensor, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
        """Mean cross-entropy and top-1 accuracy over all rows, in chunks."""
        total, correct = 0.0, 0
        for start in range(0, len(targets), CHUNK):
            part = slice(start, start + CHUNK)
            logits = self.logits(x, inputs[part])
            total += float(F.cross_entropy(logits, targets[part], reduction="sum"))
            correct += int((logits.argmax(dim=1) == targets[part]).sum())
        return total / len(targets), correct / len(targets)


class FunctionalOracle:
    """Per-worker mini-batch and full-shard gradients of a FunctionalModel's cross-entropy."""

    def __init__(
        self,
        model: FunctionalModel,
        inputs: Tensor,
        targets: Tensor,
        shards: Sequence[Tensor],
        batches: Batches,
        chunk_size: int | None = None,
    ) -> None:
        self.num_workers = len(shards)
        self.dim = model.dim
        self._model = model
        self._inputs = inputs
        self._targets = targets
        self._shards = list(shards)
        self._batches = batches
        self._per_worker_grad = vmap(
            grad(model.mean_loss), in_dims=(None, 0, 0), chunk_size=chunk_size
        )

    def sample(self, round: int) -> Tensor:
        return self._batches.sample(round)

    def grad(self, x: Tensor, batch: Tensor, out: Tensor | None = None) -> Tensor:
        """(w, d): every worker's gradient on its own rows of `batch` (w, b), one vmap call.
        `out` is ignored: vmap builds its own result."""
        return self._per_worker_grad(x, self._inputs[batch], self._targets[batch])

    def full_grad(self, x: Tensor) -> Tensor:
        return torch.stack(
            [
                self._model.loss_and_grad(x, self._inputs[s], self._targets[s])[1]
                for s in self._shards
            ]
        )


class FunctionalModelTask(ShardedTask):
    """A classification task with a FunctionalModel; subclasses supply the data and architecture.

    The global objective (`loss`, `full_gradient`, evaluate's train_loss / grad_norm_sq) is the
    mean cross-entropy over `eval_size` training rows: a fixed subsample, drawn with a generator
    keyed only by the task name (not the run seed), so runs with different seeds are compared on
    the same rows; None or eval_size >= N uses all training rows. test_loss and test_accuracy use
    the whole test set. `vmap_chunk_size` is passed to vmap (None: all workers in one call).
    """

    def __init__(
        self,
        model: FunctionalModel,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        *,
        eval_size: int | None,
        vmap_chunk_size: int | None,
        data: DataSpec,
    ) -> None:
        self.model = model
        self.vmap_chunk_size = vmap_chunk_size
        self.inputs, self.targets = train
        self.test_inputs, self.test_targets = test
        n = len(self.targets)
        if eval_size is None or eval_size >= n:
            self.eval_rows = torch.arange(n)
        else:
            perm = torch.randperm(n, generator=generator(0, self.name, "eval-rows"))
            self.eval_rows = perm[:eval_size].sort().values
        super().__init__(self.targets, data)

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return self.model.layer_sizes

    def init_params(self, seed: int) -> Tensor:
        return self.model.init_params(seed)

    def oracle(
        self, workers: Sequence[int], seed: int, *, flip_labels: bool = False
    ) -> FunctionalOracle:
        targets = self.flipped(self.targets) if flip_labels else self.targets
        shards = self.worker_shards(workers)
        batches = self.sampler(workers, seed)
        return FunctionalOracle(
            self.model, self.inputs, targets, shards, batches, self.vmap_chunk_size
        )

    def _objective(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.eval_rows
        return self.model.loss_and_grad(x, self.inputs[rows], self.targets[rows])

    def loss(self, x: Tensor) -> float:
        """Mean training cross-entropy on the evaluation rows."""
        return float(self._objective(x)[0])

    def full_gradient(self, x: Tensor) -> Tensor:
        """∇ of `loss(x)`, shape (d,)."""
        return self._objective(x)[1]

    def evaluate(self, x: Tensor) -> dict[str, float]:
        loss, gradient = self._objective(x)
        test_loss, test_accuracy = self.model.loss_and_accuracy(
            x, self.test_inputs, self.test_targets
        )
        return {
            "train_loss": float(loss),
            "grad_norm_sq": float(gradient.square().sum()),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        }
