"""Top-k selection: byzps's default path against its partition path and torch.topk, in one run.

Usage:  python benchmarks/bench_topk.py [--dim 1000000] [--ratios 0.01 0.1] [--workers 1 20]
        [--repeats 5] [--threads N]

All return the same information (the k indices of each row, ascending); torch.topk's indices are
sorted afterwards so the comparison is like for like. A last column times what an error-feedback
worker does, C(u − g): `TopK.compress_difference(u, g)` (the scan reads u and g) against
materialising u − g and compressing it by the partition path. Reports the median of `--repeats`
runs in milliseconds and the ratios (> 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from timing import median_ms

from byzps.common.compressors import TopK, topk_indices


def torch_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(z.abs(), k, dim=1, sorted=False).indices, dim=1).values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, d = {args.dim}")
    print(
        f"{'w':>4} {'k':>8} {'ours ms':>10} {'partition':>10} {'torch ms':>10} {'part/ours':>10}"
        f" {'torch/ours':>10} {'C(u-g) ms':>10} {'via u-g':>10} {'ratio':>8}"
    )
    gen = torch.Generator().manual_seed(0)
    for w in args.workers:
        z = torch.randn(w, args.dim, generator=gen)
        g = torch.randn(w, args.dim, generator=gen)
        for ratio in args.ratios:
            k = max(1, int(ratio * args.dim))
            ours = topk_indices(z, k)
            assert torch.equal(ours.long(), torch_topk(z, k)), "selections differ"
            assert torch.equal(ours, topk_indices(z, k, "numpy")), "selections differ"
            t_ours = median_ms(lambda z=z, k=k: topk_indices(z, k), args.repeats)
            t_part = median_ms(lambda z=z, k=k: topk_indices(z, k, "numpy"), args.repeats)
            t_torch = median_ms(lambda z=z, k=k: torch_topk(z, k), args.repeats)
            fused, partition = TopK(args.dim, k=k), TopK(args.dim, k=k, method="numpy")
            t_diff = median_ms(lambda c=fused, z=z, g=g: c.compress_difference(z, g), args.repeats)
            t_via = median_ms(lambda c=partition, z=z, g=g: c.compress(z - g), args.repeats)
            print(
                f"{w:>4} {k:>8} {t_ours:>10.2f} {t_part:>10.2f} {t_torch:>10.2f}"
                f" {t_part / t_ours:>10.2f} {t_torch / t_ours:>10.2f}"
                f" {t_diff:>10.2f} {t_via:>10.2f} {t_via / t_diff:>8.2f}"
            )


if __name__ == "__main__":
    main()
