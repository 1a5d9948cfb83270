"""`run.device = "cuda"`: the server's states, aggregation and step, and the simulator, on a GPU.

On a machine without a CUDA GPU (CI's) only the refusal test runs; the rest skip with one line.
On a GPU machine they check the GPU against the CPU on the same inputs:

* the Triton band-mean kernel (cm, cwtm) is bit-identical to the CPU's numba kernel, NaN, ±inf
  and ±0.0 included, and so is nnm∘cm (the GPU mixes exact columns by a matrix product);
* every aggregator runs on the GPU and agrees with the CPU (same selections, close values);
* the model step x − γ ĝ has the same bits on both devices (so a CPU worker can mirror a GPU
  server's model through the sparse downlink);
* a real cluster whose server runs with --device cuda ends with the CPU server's parameters,
  and a simulated a9a run on the GPU follows the CPU's loss.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cluster_helpers import byzps, write_config

from byzps.common.aggregators import AGGREGATORS, _triton, build_aggregator, ops
from byzps.common.aggregators._networks import band_network
from byzps.common.downlink import apply_step

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
needs_triton = pytest.mark.skipif(
    not _triton.available(), reason="no CUDA GPU with Triton on this machine"
)


def hostile_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Gaussian rows with NaN, ±inf, ±0.0 and ±FLT_MAX sprinkled into a few columns."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38])
    hits = torch.randint(0, n * d, (max(1, n * d // 50),), generator=gen)
    x.view(-1)[hits] = specials[torch.randint(0, len(specials), hits.shape, generator=gen)]
    return x


@needs_triton
@pytest.mark.parametrize(("n", "d"), [(5, 1), (20, 1000), (20, 100_003), (32, 999)])
@pytest.mark.parametrize("band", ["median", "trimmed"])
def test_the_triton_network_is_bit_identical_to_the_cpu_kernel(n: int, d: int, band: str) -> None:
    x = hostile_rows(n, d, seed=n + d)
    f = (n - 1) // 3
    a, b = ((n - 1) // 2, n // 2 + 1) if band == "median" else (f, n - f)
    cpu = ops.band_mean(x, np.empty((0, 0), np.int64), np.empty((0, 0)), a, b)
    gpu = _triton.band_mean(x.cuda(), band_network(n, a, b), a, b)
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))


@needs_triton
@pytest.mark.parametrize(("n", "d"), [(33, 517), (100, 4099), (100, 100_003)])
@pytest.mark.parametrize("band", ["median", "trimmed"])
def test_the_triton_sort_kernel_agrees_with_the_cpu_kernel(n: int, d: int, band: str) -> None:
    """Past NETWORK_ROWS rows: the same values, up to float64 summation order and the sign of
    a zero; ±inf and NaN (as +inf) in place."""
    x = hostile_rows(n, d, seed=n + d)
    f = (n - 1) // 3
    a, b = ((n - 1) // 2, n // 2 + 1) if band == "median" else (f, n - f)
    cpu = ops.band_mean(x, np.empty((0, 0), np.int64), np.empty((0, 0)), a, b)
    gpu = _triton.band_mean(x.cuda(), np.empty((0, 2), np.int64), a, b).cpu()
    assert torch.allclose(gpu, cpu, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.equal(torch.isfinite(gpu), torch.isfinite(cpu))


@needs_triton
@pytest.mark.parametrize("name", ["cm", "cwtm"])
@pytest.mark.parametrize("pre", [(), ("nnm",), ("bucketing",)])
def test_coordinatewise_rules_on_the_gpu_equal_the_cpu_bit_for_bit(
    name: str, pre: tuple[str, ...]
) -> None:
    n, f = 20, 4
    x = hostile_rows(n, 50_000, seed=1)
    x[:, :25_000] = torch.randn(n, 25_000)  # columns whose subset sums are exact
    cpu = build_aggregator(name, f, pre=pre, n=n)(x)
    gpu = build_aggregator(name, f, pre=pre, n=n)(x.cuda())
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))


@needs_cuda
def test_the_torch_formulations_agree_with_the_kernel() -> None:
    """Both GPU fallbacks without Triton: the comparator network as torch ops (bitwise) and the
    sort (equal up to the sign of zero and float64 summation order)."""
    n, f = 20, 4
    x = hostile_rows(n, 20_000, seed=2)
    empty = np.empty((0, 0), np.int64), np.empty((0, 0))
    cpu = ops.band_mean(x, *empty, f, n - f)
    with ops.forced_backend("torch"):
        network = ops.band_mean(x.cuda(), *empty, f, n - f)
    assert torch.equal(network.cpu().view(torch.int32), cpu.view(torch.int32))
    sorted_ = ops.band_mean_sorted(x.cuda(), f, n - f).cpu()
    assert torch.allclose(sorted_, cpu, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_gpu_mix_equals_the_member_by_member_mix_bit_for_bit(seed: int) -> None:
    """The GPU's nnm mix (a 0/1 matrix product where subset sums are exact, member by member
    elsewhere) is torch code: run here on the CPU against the mix the kernels reproduce."""
    n, f = 20, 4
    x = hostile_rows(n, 30_000, seed=seed)
    x[:, :10_000] = torch.randn(n, 10_000)
    gen = np.random.default_rng(seed)
    mix = np.zeros((n, n))  # nnm's shape: each row the mean of n − f rows
    for i in range(n):
        mix[i, gen.choice(n, n - f, replace=False)] = 1.0 / (n - f)
    idx, wts = ops.sparse_mix(mix)
    exc, rw = ops.complement(x, idx, wts)
    assert exc.shape[0] > 0, "the mix should be taken by complement"
    want = torch.stack(ops._mixed_rows_torch(x, idx, wts, rw))
    got = ops._mixed_rows_gpu(x, idx, wts, rw)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_the_sorted_band_mean_agrees_with_the_network() -> None:
    n, f = 20, 4
    x = hostile_rows(n, 20_000, seed=4)
    empty = np.empty((0, 0), np.int64), np.empty((0, 0))
    for a, b in (((n - 1) // 2, n // 2 + 1), (f, n - f)):
        want = ops.band_mean(x, *empty, a, b)
        assert torch.allclose(ops.band_mean_sorted(x, a, b), want, rtol=1e-6, atol=0)


def _every_rule() -> list[tuple[str, tuple[str, ...]]]:
    return [(name, ()) for name in sorted(AGGREGATORS.names())] + [
        ("cm", ("nnm",)),
        ("gm", ("nnm",)),
        ("krum", ("nnm",)),
        ("cwtm", ("arc",)),
        ("mean", ("clip",)),
    ]


@needs_cuda
@pytest.mark.parametrize(("name", "pre"), _every_rule())
def test_every_rule_runs_on_the_gpu_and_agrees_with_the_cpu(
    name: str, pre: tuple[str, ...]
) -> None:
    n, f, d = 11, 2, 3000
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=gen)
    x[-f:] += 10.0  # the outliers every rule must notice
    params = {"c": 2.0} if "clip" in pre else {}
    cpu_rule = build_aggregator(name, f, pre=pre, params=params, n=n)
    gpu_rule = build_aggregator(name, f, pre=pre, params=params, n=n)
    cpu, gpu = cpu_rule(x), gpu_rule(x.cuda())
    assert gpu.is_cuda and gpu.dtype == torch.float32
    gap = float((gpu.cpu() - cpu).abs().max())
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6), gap
    if cpu_rule.last_verdict is not None:
        cpu_kept = cpu_rule.last_verdict.discount(x, None)
        gpu_kept = gpu_rule.last_verdict.discount(x, None)
        assert np.allclose(cpu_kept, gpu_kept, atol=1e-6)


@needs_cuda
def test_the_model_step_has_the_same_bits_on_gpu_and_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(1_000_003, generator=gen), torch.randn(1_000_003, generator=gen)
    on_gpu = x.cuda()
    apply_step(x, g, 0.037)
    apply_step(on_gpu, g.cuda(), 0.037)
    assert torch.equal(on_gpu.cpu().view(torch.int32), x.view(torch.int32))


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(byzps(*args), capture_output=True, text=True, timeout=timeout)


@needs_cuda
def test_a_cluster_with_its_server_on_the_gpu_ends_where_the_cpu_server_does(
    tmp_path: Path,
) -> None:
    """`byzps launch --device cuda`: the server on the GPU, the workers on the CPU (the digest
    leaves run.device out, so they register), cm without nnm so the aggregate is exact."""
    config = write_config(tmp_path / "run.toml", rounds=30)
    text = config.read_text().replace('pre = ["nnm"]', "pre = []")
    config.write_text(text)
    finals = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        done = _run("launch", "--config", str(config), "--out", str(out), "--device", device)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        finals.append(np.load(out / "params.npy"))
    assert np.array_equal(finals[0], finals[1])


@needs_cuda
def test_a_simulated_a9a_run_on_the_gpu_follows_the_cpu(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", rounds=200)
    losses = []
    for device in ("cpu", "cuda"):
        done = _run(
            "simulate", "--config", str(config), "--out", str(tmp_path / device),
            "--device", device,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        lines = (tmp_path / device / "metrics.jsonl").read_text().splitlines()
        losses.append(float(lines[-1].split('"train_loss": ')[1].split(",")[0]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU: the refusal cannot be shown")
def test_asking_for_a_gpu_where_there_is_none_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", rounds=5)
    out = tmp_path / "o"
    done = _run("simulate", "--config", str(config), "--out", str(out), "--device", "cuda")
    assert done.returncode != 0
    assert "run.device" in done.stderr and "CUDA" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "params.npy").exists()
    bad = _run("simulate", "--config", str(config), "--out", str(tmp_path / "p"), "--device", "tpu")
    assert bad.returncode != 0 and "run.device" in bad.stderr, bad.stderr


def test_a_gpu_run_is_simulated_alone_not_in_a_cpu_batch() -> None:
    from byzps.common.config import RunConfig
    from byzps.sim.batched import batchable

    base = {"compressor": {"name": "topk", "k": 1}}
    assert batchable(RunConfig.from_dict(base))
    assert not batchable(RunConfig.from_dict({**base, "run": {"device": "cuda"}}))


def test_the_config_digest_leaves_the_device_out() -> None:
    from byzps.common.config import RunConfig

    base = {"compressor": {"name": "topk", "k": 1}}
    cpu = RunConfig.from_dict(base)
    gpu = RunConfig.from_dict({**base, "run": {"device": "cuda:1"}})
    other = RunConfig.from_dict({**base, "run": {"seed": 1}})
    assert cpu.digest() == gpu.digest() != other.digest()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
