"""Tasks: data loading, analytic and batched gradients, sampling, the factory and the parser."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import sys

import pytest
import torch
import torch.nn.functional as F
from optional import need_fashion_mnist

from byzps.common.tasks import TASKS, DataSpec, build_task
from byzps.common.tasks.a9a import A9aLogRegTask, l2_optimum, load_a9a
from byzps.common.tasks.digits import load_digits_split
from byzps.common.tasks.fmnist import resolve_data_dir
from byzps.common.tasks.libsvm import LibsvmFormatError, parse_libsvm

A9A_SHA256 = {
    "a9a": "7ba53cccb27e2e525f0fb173e1f446d49856e3fb007eb43be4ec6d0f5b3335ca",
    "a9a.t": "1f448a153f0320399a7e40836eb207655b0bde0f21fc941cc472193daa9f5de9",
}


# ---------------------------------------------------------------- LIBSVM parser


def test_libsvm_parses_sparse_rows_comments_and_blank_lines() -> None:
    lines = ["+1 1:0.5 3:2", "", "# a comment", "-1 2:1e-1  # trailing", "0"]
    features, labels = parse_libsvm(lines, 3)
    assert features.dtype == torch.float32 and features.shape == (3, 3)
    assert torch.equal(labels, torch.tensor([1.0, -1.0, 0.0]))
    expected = torch.tensor([[0.5, 0.0, 2.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(features, expected)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("x 1:1", "label 'x'"),
        ("1 2=1", "index:value"),
        ("1 a:1", "non-numeric"),
        ("1 2:z", "non-numeric"),
        ("1 4:1", "outside \\[1, 3\\]"),
        ("1 0:1", "outside"),
        ("1 2:1 2:1", "out of order"),
    ],
)
def test_libsvm_errors_name_the_line(bad: str, message: str) -> None:
    lines = ["1 1:1", "", "-1 3:1", bad]
    with pytest.raises(LibsvmFormatError, match=f"^toy, line 4: .*{message}"):
        parse_libsvm(lines, 3, source="toy")


# ---------------------------------------------------------------- a9a data


@pytest.mark.parametrize("name", sorted(A9A_SHA256))
def test_shipped_a9a_matches_its_checksum(name: str) -> None:
    resource = importlib.resources.files("byzps.common") / "data" / f"{name}.gz"
    data = gzip.decompress(resource.read_bytes())
    assert hashlib.sha256(data).hexdigest() == A9A_SHA256[name]


def test_a9a_shapes_labels_and_normalisation() -> None:
    features, labels = load_a9a("train")
    test_features, test_labels = load_a9a("test")
    assert features.shape == (32561, 123) and test_features.shape == (16281, 123)
    assert set(labels.unique().tolist()) == {0.0, 1.0} == set(test_labels.unique().tolist())
    assert int(labels.sum()) == 7841
    for x in (features, test_features):
        assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-6)
    assert load_a9a("train") is load_a9a("train")  # parsed once per process


# ---------------------------------------------------------------- a9a gradients

REGULARIZERS = [("l2", 5.6e-4), ("nonconvex", 0.1)]


def reference_regularizer(kind: str, lam: float, x: torch.Tensor) -> torch.Tensor:
    if kind == "l2":
        return lam / 2 * x.square().sum()
    return lam * (x.square() / (1 + x.square())).sum()


def reference_loss(kind: str, lam: float, x: torch.Tensor, rows: torch.Tensor, y: torch.Tensor):
    """Mean BCE + regulariser, written independently of the task code (for autograd)."""
    bce = F.binary_cross_entropy_with_logits(rows @ x, y)
    return bce + reference_regularizer(kind, lam, x)


@pytest.fixture(scope="module", params=REGULARIZERS, ids=[r[0] for r in REGULARIZERS])
def task64(request: pytest.FixtureRequest) -> A9aLogRegTask:
    kind, _ = request.param
    return A9aLogRegTask(
        data=DataSpec(num_workers=8, seed=5, batch_size=4), regularizer=kind, dtype="float64"
    )


def test_default_lambda_and_unknown_regularizer(task64: A9aLogRegTask) -> None:
    assert task64.reg.lam == dict(REGULARIZERS)[task64.reg.kind]
    with pytest.raises(ValueError, match="unknown regularizer 'l1'"):
        A9aLogRegTask(data=DataSpec(num_workers=2, seed=0), regularizer="l1")


def random_point(seed: int = 0) -> torch.Tensor:
    return torch.randn(123, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a9a_batched_grad_matches_autograd(task64: A9aLogRegTask) -> None:
    workers = [0, 3, 7]
    oracle = task64.oracle(workers, seed=11)
    x = random_point()
    batch = oracle.sample(4)
    assert batch.shape == (3, 4)
    grads = oracle.grad(x, batch)
    for row in range(3):
        xr = x.clone().requires_grad_(True)
        rows, y = task64.features[batch[row]], task64.labels[batch[row]]
        loss = reference_loss(task64.reg.kind, task64.reg.lam, xr, rows, y)
        (expected,) = torch.autograd.grad(loss, xr)
        torch.testing.assert_close(grads[row], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("workers", [None, [1, 2, 6]])
def test_a9a_full_gradient_matches_finite_differences(
    task64: A9aLogRegTask, workers: list[int] | None
) -> None:
    x = random_point(1)
    gradient = task64.full_gradient(x, workers)
    h = 1e-5
    generator = torch.Generator().manual_seed(2)
    directions = [torch.eye(123, dtype=torch.float64)[j] for j in (0, 60, 122)]
    directions += [torch.randn(123, generator=generator, dtype=torch.float64) for _ in range(3)]
    for v in directions:
        fd = (task64.loss(x + h * v, workers) - task64.loss(x - h * v, workers)) / (2 * h)
        assert fd == pytest.approx(float(gradient @ v), rel=1e-6, abs=1e-9)


def test_a9a_batched_oracle_equals_single_worker_oracles(task64: A9aLogRegTask) -> None:
    """The simulator (w = n) and a worker daemon (w = 1) draw and compute the same."""
    workers = [5, 0, 2]
    batched = task64.oracle(workers, seed=9)
    x = random_point(3)
    for round in (0, 1, 17):
        batch = batched.sample(round)
        grads = batched.grad(x, batch)
        for row, worker in enumerate(workers):
            single = task64.oracle([worker], seed=9)
            single_batch = single.sample(round)
            assert torch.equal(single_batch[0], batch[row])
            torch.testing.assert_close(single.grad(x, single_batch)[0], grads[row])
    full = batched.full_grad(x)
    for row, worker in enumerate(workers):
        torch.testing.assert_close(task64.oracle([worker], seed=9).full_grad(x)[0], full[row])


def test_a9a_sample_is_a_pure_function_of_seed_and_round() -> None:
    task = A9aLogRegTask(data=DataSpec(num_workers=4, seed=0, batch_size=16))
    oracle = task.oracle(range(4), seed=1)
    first = oracle.sample(3)
    oracle.sample(4)
    assert torch.equal(first, oracle.sample(3))
    assert torch.equal(first, task.oracle(range(4), seed=1).sample(3))
    assert not torch.equal(first, oracle.sample(4))
    assert not torch.equal(first, task.oracle(range(4), seed=2).sample(3))
    for row, worker in enumerate(range(4)):
        assert torch.isin(first[row], task.shards[worker]).all()
    # Worker streams differ: position 0 of each shard-local draw is not shared by all workers.
    positions = [torch.searchsorted(task.shards[w], first[w]) for w in range(4)]
    assert len({tuple(p.tolist()) for p in positions}) == 4


def test_a9a_batches_are_uniform_over_the_shard() -> None:
    """Counter-based draws: every shard position is hit about equally often (chi-square)."""
    task = A9aLogRegTask(data=DataSpec(num_workers=20, seed=0, batch_size=4))
    oracle = task.oracle([3], seed=5)
    shard = task.shards[3]
    counts = torch.zeros(shard.numel())
    for round in range(2000):
        counts += torch.bincount(
            torch.searchsorted(shard, oracle.sample(round)[0]), minlength=shard.numel()
        )
    expected = counts.sum() / shard.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = shard.numel() - 1
    assert abs(chi2 - dof) < 5 * (2 * dof) ** 0.5


def test_a9a_full_grad_is_the_mean_of_per_example_gradients(task64: A9aLogRegTask) -> None:
    oracle = task64.oracle([4, 1], seed=0)
    x = random_point(4)
    full = oracle.full_grad(x)
    for row, worker in enumerate([4, 1]):
        shard = task64.shards[worker]

        def example_loss(x: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return reference_loss(task64.reg.kind, task64.reg.lam, x, a[None], y[None])

        per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(
            x, task64.features[shard], task64.labels[shard]
        )
        torch.testing.assert_close(full[row], per_example.mean(0), rtol=1e-10, atol=1e-12)


def test_a9a_label_flip(task64: A9aLogRegTask) -> None:
    honest = task64.oracle([2], seed=0)
    flipped = task64.oracle([2], seed=0, flip_labels=True)
    x = random_point(5)
    batch = honest.sample(0)
    rows, y = task64.features[batch[0]], task64.labels[batch[0]]
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        reference_loss(task64.reg.kind, task64.reg.lam, xr, rows, 1 - y), xr
    )
    torch.testing.assert_close(flipped.grad(x, batch)[0], expected)


def test_a9a_evaluate_at_zero() -> None:
    task = A9aLogRegTask(data=DataSpec(num_workers=20, seed=0))
    x = task.init_params(0)
    assert torch.equal(x, torch.zeros(123)) and task.layer_sizes == (123,) and task.dim == 123
    metrics = task.evaluate(x)
    _, test_labels = load_a9a("test")
    assert metrics["train_loss"] == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)
    assert metrics["test_loss"] == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)
    assert metrics["test_accuracy"] == pytest.approx(1 - float(test_labels.mean()))
    assert metrics["grad_norm_sq"] == pytest.approx(float(task.full_gradient(x).square().sum()))
    assert metrics["grad_norm_sq"] > 0


def test_a9a_l2_optimum_agrees_with_lbfgs_and_gives_the_loss_gap() -> None:
    """Newton's f* against scipy's L-BFGS on the same float64 objective, and loss_gap = f − f*:
    non-negative, 0 at the minimiser, absent for the non-convex regulariser (f* unknown)."""
    minimize = pytest.importorskip("scipy.optimize").minimize
    task = A9aLogRegTask(data=DataSpec(num_workers=1, seed=0), dtype="float64")

    def objective(x):
        xt = torch.from_numpy(x)
        return float(task.loss(xt)), task.full_gradient(xt).numpy()

    found = minimize(objective, torch.zeros(123).double().numpy(), jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-12, "maxiter": 10_000})  # fmt: skip
    assert found.success
    f_star = l2_optimum(task.reg.lam)
    assert found.fun - 1e-8 < f_star <= found.fun  # Newton converges further than L-BFGS
    at_lbfgs = task.evaluate(torch.from_numpy(found.x))
    assert at_lbfgs["loss_gap"] == pytest.approx(found.fun - f_star, abs=1e-12)
    at_zero = task.evaluate(task.init_params(0))
    assert at_zero["loss_gap"] == pytest.approx(at_zero["train_loss"] - f_star, rel=1e-6)
    nonconvex = A9aLogRegTask(data=DataSpec(num_workers=1, seed=0), regularizer="nonconvex")
    assert nonconvex.optimal_loss() is None and "loss_gap" not in nonconvex.evaluate(
        nonconvex.init_params(0)
    )
    with pytest.raises(ValueError, match="lam > 0"):
        l2_optimum(0.0)


def test_a9a_oracle_rejects_bad_worker_ids() -> None:
    task = A9aLogRegTask(data=DataSpec(num_workers=3, seed=0))
    with pytest.raises(ValueError, match="worker id 3 outside"):
        task.oracle([0, 3], seed=0)
    with pytest.raises(ValueError, match="distinct"):
        task.oracle([1, 1], seed=0)


# ---------------------------------------------------------------- factory


def test_registered_tasks_and_factory_errors() -> None:
    assert {"a9a-logreg", "fmnist-cnn", "digits-mlp"} <= set(TASKS.names())
    task = build_task(
        "a9a-logreg",
        DataSpec(num_workers=4, seed=0, batch_size=2, split="dirichlet", alpha=0.3),
        lam=0.01,
    )
    assert (
        isinstance(task, A9aLogRegTask) and task.reg.lam == 0.01 and task.data.split == "dirichlet"
    )
    with pytest.raises(ValueError, match="no parameter 'momentum'"):
        build_task("a9a-logreg", DataSpec(num_workers=4, seed=0, batch_size=1), momentum=0.9)
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        build_task("mnist", DataSpec(num_workers=4, seed=0, batch_size=1))
    with pytest.raises(ValueError, match="unknown split"):
        build_task("a9a-logreg", DataSpec(num_workers=4, seed=0, batch_size=1, split="random"))


@pytest.mark.parametrize(("name", "params"), [("a9a-logreg", {}), ("quadratic", {"dim": 40})])
def test_analytic_oracles_give_the_same_bits_under_inference_mode(name: str, params: dict) -> None:
    """The tasks whose simulated rounds run under torch.inference_mode (`analytic_gradients`):
    their gradients there are bitwise those computed outside it."""
    task = build_task(name, DataSpec(num_workers=4, seed=0, batch_size=2), **params)
    assert task.analytic_gradients
    oracle = task.oracle([0, 2, 3], seed=1)
    x = torch.randn(task.dim, generator=torch.Generator().manual_seed(7)).to(task.init_params(0))
    outside = (oracle.grad(x, oracle.sample(3)), oracle.full_grad(x))
    with torch.inference_mode():
        inside = (oracle.grad(x, oracle.sample(3)), oracle.full_grad(x))
    assert all(torch.equal(a, b) for a, b in zip(outside, inside, strict=True))


# ---------------------------------------------------------------- neural-network tasks


@pytest.fixture(scope="module", params=["digits-mlp", "fmnist-cnn"])
def nn_task(request: pytest.FixtureRequest):
    if request.param == "fmnist-cnn":
        need_fashion_mnist()
    extra = {"max_train": 3000, "eval_size": 500} if request.param == "fmnist-cnn" else {}
    return build_task(
        request.param, DataSpec(num_workers=5, seed=0, batch_size=8, split="sorted-mix"), **extra
    )


def test_nn_vmap_gradients_equal_per_worker_autograd(nn_task) -> None:
    workers = [4, 0, 2]
    oracle = nn_task.oracle(workers, seed=3)
    x = nn_task.init_params(1)
    batch = oracle.sample(2)
    grads = oracle.grad(x, batch)
    assert grads.shape == (3, nn_task.dim)
    for row, worker in enumerate(workers):
        assert torch.isin(batch[row], nn_task.shards[worker]).all()
        xr = x.clone().requires_grad_(True)
        logits = nn_task.model.logits(xr, nn_task.inputs[batch[row]])
        (expected,) = torch.autograd.grad(F.cross_entropy(logits, nn_task.targets[batch[row]]), xr)
        torch.testing.assert_close(grads[row], expected, rtol=1e-4, atol=1e-6)


def test_nn_full_grad_matches_shard_gradient(nn_task) -> None:
    oracle = nn_task.oracle([1], seed=0)
    x = nn_task.init_params(0)
    shard = nn_task.shards[1]
    xr = x.clone().requires_grad_(True)
    logits = nn_task.model.logits(xr, nn_task.inputs[shard])
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, nn_task.targets[shard]), xr)
    torch.testing.assert_close(oracle.full_grad(x)[0], expected, rtol=1e-4, atol=1e-6)


def test_nn_tasks_keep_autograd(nn_task) -> None:
    """Why `analytic_gradients` is off for them: their full gradient calls autograd, which
    inference mode refuses, so a simulated round of theirs must not enter it."""
    assert not nn_task.analytic_gradients
    oracle = nn_task.oracle([1], seed=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="does not require grad"):
        oracle.full_grad(nn_task.init_params(0))


def test_nn_layout_and_init(nn_task) -> None:
    module = nn_task.model._factory()
    assert nn_task.layer_sizes == tuple(p.numel() for p in module.parameters())
    assert sum(nn_task.layer_sizes) == nn_task.dim
    assert nn_task.dim == {"digits-mlp": 2410, "fmnist-cnn": 29994}[nn_task.name]
    state = torch.random.get_rng_state()
    x = nn_task.init_params(7)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert x.shape == (nn_task.dim,) and torch.equal(x, nn_task.init_params(7))
    assert not torch.equal(x, nn_task.init_params(8))


def test_nn_label_flip(nn_task) -> None:
    honest = nn_task.oracle([3], seed=0)
    flipped = nn_task.oracle([3], seed=0, flip_labels=True)
    x = nn_task.init_params(0)
    batch = honest.sample(0)
    xr = x.clone().requires_grad_(True)
    logits = nn_task.model.logits(xr, nn_task.inputs[batch[0]])
    targets = 9 - nn_task.targets[batch[0]]
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, targets), xr)
    torch.testing.assert_close(flipped.grad(x, batch)[0], expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(honest.grad(x, batch)[0], expected)


def test_nn_evaluate(nn_task) -> None:
    x = nn_task.init_params(0)
    metrics = nn_task.evaluate(x)
    assert set(metrics) == {"train_loss", "grad_norm_sq", "test_loss", "test_accuracy"}
    assert metrics["train_loss"] == pytest.approx(nn_task.loss(x))
    assert metrics["grad_norm_sq"] == pytest.approx(float(nn_task.full_gradient(x).square().sum()))
    assert 1.5 < metrics["test_loss"] < 3.5 and 0.0 <= metrics["test_accuracy"] <= 1.0
    expected_test = {"digits-mlp": 360, "fmnist-cnn": 10000}[nn_task.name]
    assert len(nn_task.test_targets) == expected_test


def test_fmnist_missing_directory_is_named(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        resolve_data_dir(tmp_path)
    monkeypatch.setenv("BYZPS_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*dataset-fashion-mnist"):
        build_task("fmnist-cnn", DataSpec(num_workers=2, seed=0, batch_size=4))


def test_fmnist_data() -> None:
    need_fashion_mnist()
    task = build_task("fmnist-cnn", DataSpec(num_workers=2, seed=0, batch_size=4), max_train=100)
    assert task.inputs.shape == (100, 1, 28, 28) and task.test_inputs.shape == (10000, 1, 28, 28)
    assert set(task.test_targets.unique().tolist()) == set(range(10))


def test_digits_split_is_fixed_and_stratified() -> None:
    train_x, _, test_x, test_y = load_digits_split()
    assert train_x.shape == (1437, 64) and test_x.shape == (360, 64)
    counts = torch.bincount(test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_without_scikit_learn(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    load_digits_split.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install byzps\[tasks\]"):
            load_digits_split()
    finally:
        load_digits_split.cache_clear()
