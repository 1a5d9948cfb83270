"""Wire size of one update per compressor against the ideal size of its encoding.

Usage:  python benchmarks/bench_wire_size.py [--dims 123 1000000] [--workers 10] [--ratio 0.01]
                                             [--repeats 3]

For each d and compressor it compresses one honest row (z ~ N(0, 1), worker 1 of n, round 0),
encodes it as a worker does (byzps.common.codec.encode_update), and prints the serialized
SparseUpdate bytes, the ideal bytes, their ratio (goal ≤ 1.05) and the median encode + decode
time. The ideal is the information in the encoding, without protobuf's framing, in bits:

  topk       k·(32 + b)          k indices (uint32) and values of b bits (32, or 16 cast)
  randk      k·(32 + b) + 64     the same and the 64-bit seed the server regenerates them from
  permk      k·(32 + b) + 64     likewise, k = ⌈d/n⌉
  identity   d·b                 values only (the dense convention omits indices)
  qsgd       d·(1 + ⌈log2(s + 1)⌉) + 32    sign and level per coordinate, the float32 norm
  natural-dithering   the same as qsgd
  natural    9·d                 float32 sign and exponent per coordinate
  sign       d + 32              a sign bit per coordinate, the float32 scale

rounded up to whole bytes. Rand-k and Perm-K could drop their indices (regenerable from the
seed), which would halve their size; the ideal above is that of the format as it is.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable

import torch
from timing import median_ms

from byzps.common.codec import decode_sparse, encode_update
from byzps.common.compressors import Compressor, build_compressor, codes

#: (label, compressor name, params given k) in the printed order.
Case = tuple[str, str, Callable[[int], dict]]
CASES: list[Case] = [
    ("topk", "topk", lambda k: {"k": k}),
    ("topk fp16", "topk", lambda k: {"k": k, "values": "float16"}),
    ("randk", "randk", lambda k: {"k": k}),
    ("randk bf16", "randk", lambda k: {"k": k, "values": "bfloat16"}),
    ("permk", "permk", lambda k: {}),
    ("permk fp16", "permk", lambda k: {"values": "float16"}),
    ("identity", "identity", lambda k: {}),
    ("identity fp16", "identity", lambda k: {"values": "float16"}),
    ("qsgd s=1", "qsgd", lambda k: {"levels": 1}),
    ("qsgd s=15", "qsgd", lambda k: {"levels": 15}),
    ("natural", "natural", lambda k: {}),
    ("dithering s=8", "natural-dithering", lambda k: {"levels": 8}),
    ("sign", "sign", lambda k: {}),
]


def ideal_bits(comp: Compressor) -> int:
    """The ideal of the module docstring for `comp`."""
    d, k = comp.dim, comp.k
    value_bits = 32 if comp.values == "float32" else 16
    if comp.name == "topk":
        return k * (32 + value_bits)
    if comp.name in ("randk", "permk"):
        return k * (32 + value_bits) + 64
    if comp.name == "identity":
        return d * value_bits
    if comp.name in ("qsgd", "natural-dithering"):
        return d * codes.level_bits(comp.levels) + 32
    if comp.name == "natural":
        return d * codes.NATURAL_BITS
    if comp.name == "sign":
        return d + 32
    raise ValueError(f"no ideal for {comp.name!r}")


def measure(comp: Compressor, repeats: int) -> tuple[int, int, float]:
    """(wire bytes, ideal bytes, median encode + decode ms) of one compressed row."""
    z = torch.randn(1, comp.dim, generator=torch.Generator().manual_seed(0))
    seeds = comp.row_seeds(0, [1], 0) if comp.seeded else None
    vec = comp.compress(z, seeds, [1]).row(0)
    wire = encode_update(vec, comp).SerializeToString()

    def roundtrip() -> None:
        msg = encode_update(vec, comp)
        decode_sparse(type(msg).FromString(msg.SerializeToString()))

    return len(wire), math.ceil(ideal_bits(comp) / 8), median_ms(roundtrip, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[123, 1_000_000])
    parser.add_argument("--workers", type=int, default=10, help="n, for Perm-K's k = ⌈d/n⌉")
    parser.add_argument("--ratio", type=float, default=0.01, help="k/d of Top-k and Rand-k")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("# " + shlex.join(["python", *sys.argv]))
    print(f"{'d':>8} {'compressor':<14} {'k':>8} {'wire B':>10} {'ideal B':>10} {'ratio':>6} "
          f"{'ms':>8}")  # fmt: skip
    for d in args.dims:
        k = max(1, math.floor(args.ratio * d))
        for label, name, params in CASES:
            comp = build_compressor(name, d, num_workers=args.workers, **params(k))
            wire, ideal, ms = measure(comp, args.repeats)
            print(f"{d:>8} {label:<14} {comp.k:>8} {wire:>10} {ideal:>10} {wire / ideal:>6.3f} "
                  f"{ms:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
