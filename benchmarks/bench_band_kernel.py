"""The Triton band-mean kernel (cm's median band) per block size and warp count, against the
plain mean on the same (n, d) float32 rows of one GPU: picks `_triton._BLOCKS`.

    python benchmarks/bench_band_kernel.py --n 20 100 --d 10000000 --repeat 5

Each configuration is compiled and warmed up once, then timed `--repeat` times, each call right
after a call of the mean (torch's x.mean(0)), and reported as the median time, the bandwidth over
the n·d·4 input bytes and the share of the mean's bandwidth (median of the per-pair ratios).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from byzps.common.aggregators import _triton
from byzps.common.aggregators._networks import band_network


def _once(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--d", type=int, default=10_000_000)
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not _triton.available():
        sys.exit("needs a CUDA GPU and Triton")
    print("$", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("   n  block warps       ms    GB/s  % mean compile s")
    for n in args.n:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, args.d, generator=gen, device="cuda")
        for block in args.blocks:
            for warps in args.warps:
                measure(x, block, warps, args.repeat)
        del x
        torch.cuda.empty_cache()


def measure(x: torch.Tensor, block: int, warps: int, repeat: int) -> None:
    """Print one configuration's row: the median band of x's rows, timed against x.mean(0)."""
    n, d = x.shape
    a, b = (n - 1) // 2, n // 2 + 1
    network = band_network(n, a, b)

    def kernel() -> object:
        return _triton.band_mean(x, network, a, b, block, warps)

    compile_s = _once(kernel)
    pairs = [(_once(lambda: x.mean(0)), _once(kernel)) for _ in range(repeat)]
    t = statistics.median(k for _, k in pairs)
    share = 100 / statistics.median(k / m for m, k in pairs)
    print(f"{n:>4} {block:>6} {warps:>5} {1e3 * t:>8.2f} {n * d * 4 / 1e9 / t:>7.0f} "
          f"{share:>6.0f}% {compile_s:>9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
