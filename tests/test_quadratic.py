"""The synthetic `quadratic` task: exact gradients, reproducible noise, an exact optimum, and its
parameters in the run config (task.params)."""

from __future__ import annotations

import pytest
import torch

from byzps.common.catalog import check_components
from byzps.common.components import build_run_task
from byzps.common.config import ConfigError, RunConfig
from byzps.common.tasks import DataSpec, build_task
from byzps.common.tasks.quadratic import QuadraticTask
from byzps.sim.build import build_simulation

DATA_KEYS = ("num_workers", "seed", "batch_size", "split", "sampling", "split_over")


def task(**params: object) -> QuadraticTask:
    settings = {"num_workers": 5, "seed": 1, "batch_size": 1, "dim": 300} | params
    data = DataSpec(**{k: settings.pop(k) for k in DATA_KEYS if k in settings})  # type: ignore[arg-type]
    built = build_task("quadratic", data, **settings)
    assert isinstance(built, QuadraticTask)
    return built


def test_full_gradient_is_the_gradient_of_the_worker_loss() -> None:
    t = task()
    x = torch.randn(300, dtype=torch.float64)
    grads = t.oracle([4, 1], seed=0).full_grad(x.float())
    for row, worker in enumerate([4, 1]):
        xs = x.clone().requires_grad_()
        f = 0.5 * (t.curvature.double() * (xs - t.target(worker).double()) ** 2).sum()
        f.backward()
        torch.testing.assert_close(grads[row].double(), xs.grad, rtol=1e-6, atol=1e-6)


def test_a_worker_alone_draws_what_the_whole_batch_draws_for_it() -> None:
    t = task(noise=0.7)
    x = torch.randn(300)
    all_rows = t.oracle(range(5), seed=9)
    alone = t.oracle([3], seed=9)
    batch = all_rows.sample(12)
    assert torch.equal(all_rows.grad(x, batch)[3], alone.grad(x, alone.sample(12))[0])


def test_noise_is_fixed_by_the_round_and_scaled_by_the_batch_size() -> None:
    x = torch.zeros(20_000)
    oracle = task(dim=20_000, noise=2.0, batch_size=4).oracle([0], seed=0)
    same = oracle.grad(x, oracle.sample(5))
    assert torch.equal(same, oracle.grad(x, oracle.sample(5)))
    noise = oracle.grad(x, oracle.sample(6)) - oracle.full_grad(x)
    assert not torch.equal(same, oracle.grad(x, oracle.sample(6)))
    assert abs(float(noise.std()) - 2.0 / 4**0.5) < 0.03  # σ/√b = 1, 20 000 draws


def test_a_reused_gradient_buffer_changes_no_bit_and_makes_no_new_buffer() -> None:
    """Byz-DM21 and Byz-VR-DM21 hand the oracle last round's gradient buffer to write into: the
    messages are bit for bit those of fresh buffers, and from the second round on no d-sized
    gradient buffer is made (at d = 1e7 a fresh one cost a tenth of a worker's CPU)."""
    from byzps.common.compressors import TopK
    from byzps.common.estimators import build_estimator

    t = task(dim=20_000, noise=0.3)
    for name in ("byz-dm21", "byz-vr-dm21"):
        runs = {}
        for reuse in (True, False):
            est = build_estimator(name, dim=20_000, compressor=TopK(20_000, k=200), eta=0.2)
            if not reuse:
                est._grad_buffer = None
                est.grad = lambda oracle, x, batch, reuse=False, est=est: est._cast(
                    oracle.grad(x, batch)
                )
            oracle = t.oracle([2], seed=3)
            x = torch.zeros(20_000)
            sent, buffers = [], []
            for r in range(4):
                message = est.message(x, oracle, r)
                est.commit(message)
                sent.append(message)
                buffers.append(None if est._grad_buffer is None else est._grad_buffer.data_ptr())
                x = x - 0.1 * message.to_dense()[0]
            runs[reuse] = sent, buffers
        for fresh, reused in zip(runs[False][0], runs[True][0], strict=True):
            assert torch.equal(fresh.indices, reused.indices), name
            assert torch.equal(fresh.values, reused.values), name
        assert len(set(runs[True][1])) == 1 and runs[True][1][0] is not None, name


def test_an_out_buffer_of_another_dtype_than_the_result_is_not_written() -> None:
    """x in float64 against float32 targets gives a float64 gradient: a float32 `out` would
    round it, so the oracle leaves it alone and returns the fresh result."""
    oracle = task().oracle([1], seed=0)
    x = torch.randn(300, dtype=torch.float64)
    out = torch.zeros(1, 300)
    grads = oracle.full_grad(x, out)
    assert grads.dtype == torch.float64 and torch.equal(grads, oracle.full_grad(x))
    assert not out.any()


def test_the_optimum_is_the_mean_target_with_the_exact_loss() -> None:
    t = task(heterogeneity=0.5)
    x_star, f_star = t.optimum()
    targets = torch.stack([t.target(i).double() for i in range(5)])
    torch.testing.assert_close(x_star, targets.mean(0))
    h = t.curvature.double()
    brute = float(torch.stack([0.5 * (h * (x_star - b) ** 2).sum() for b in targets]).mean())
    assert f_star == pytest.approx(brute, rel=1e-12)
    at_optimum = t.evaluate(x_star.float())
    assert at_optimum["loss_gap"] < 1e-9 and at_optimum["grad_norm_sq"] < 1e-9
    x = torch.randn(300)
    brute_x = float(torch.stack([0.5 * (h * (x.double() - b) ** 2).sum() for b in targets]).mean())
    assert t.evaluate(x)["train_loss"] == pytest.approx(brute_x, rel=1e-10)


def test_label_flip_negates_the_targets() -> None:
    t = task()
    x = torch.zeros(300)
    honest, flipped = t.oracle([2], 0).full_grad(x), t.oracle([2], 0, flip_labels=True).full_grad(x)
    assert torch.equal(honest, -flipped)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dim": 0}, "dim"),
        ({"noise": -1.0}, "noise"),
        ({"mu": 2.0, "L": 1.0}, "mu"),
        ({"split": "dirichlet"}, "split"),
        ({"sampling": "shuffle"}, "sampling"),
        ({"split_over": "honest"}, "split_over"),
    ],
)
def test_bad_parameters_are_refused(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        task(**params)


def quadratic_config(**task_params: object) -> RunConfig:
    return RunConfig.from_dict(
        {
            "run": {"seed": 0, "rounds": 400, "eval_every": 400},
            "task": {"name": "quadratic", "params": {"dim": 2000} | task_params},
            "cluster": {"workers": 5, "byzantine": 1},
            "algorithm": {"name": "byz-dm21", "lr": 0.5, "eta": 0.5},
            "compressor": {"name": "topk", "ratio": 0.1},
            "aggregator": {"name": "cm"},
            "attack": {"name": "sf"},
        }
    )


def test_task_params_come_from_the_config_and_unknown_ones_name_the_key() -> None:
    assert build_run_task(quadratic_config(noise=0.25)).dim == 2000
    with pytest.raises(ConfigError, match=r"task\.params: .*'dimm'"):
        check_components(quadratic_config(dimm=3))
    with pytest.raises(ConfigError, match=r"^task: .*dim"):
        build_run_task(quadratic_config(dim=-5))


def test_byz_dm21_under_sign_flip_approaches_the_optimum() -> None:
    """With heterogeneity 0.1 the median's own bias leaves a gap of ~1.4 (of ~390 at x⁰)."""
    config = quadratic_config(noise=0.1, heterogeneity=0.1)
    sim = build_simulation(config)
    t = build_run_task(config)
    start = t.evaluate(sim.x)["loss_gap"]
    for _ in range(config.run.rounds):
        sim.step()
    end = t.evaluate(sim.x)["loss_gap"]
    assert end < start / 100, (start, end)
