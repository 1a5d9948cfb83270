"""Wire codec: packed `bytes` fields against protobuf `repeated` fields, in the same run.

Usage:  python benchmarks/bench_codec.py [--sizes 10000 1000000] [--density 0.01] [--repeats 7]

For each size k it builds one k-sparse float32 update (sorted random indices in a vector of
d = k / density coordinates) and times a full wire round trip both ways:

  bytes     encode_sparse → SerializeToString → FromString → decode_sparse (SparseUpdate)
  repeated  lists into RepeatedSparseUpdate → SerializeToString → FromString → numpy → tensors

Both sides end with int32 indices and float32 values in torch tensors. The bytes side also runs
every receiver check (lengths, range, order, finiteness) that the repeated side skips, so its
advantage is if anything understated. Reports medians in milliseconds, the ratio repeated / bytes
(> 1: bytes is faster) and wire bytes per update over 8·k (the goal for bytes is ≤ 1.05).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch
from timing import median_ms

from byzps.common.codec import decode_sparse, encode_sparse
from byzps.common.sparse import SparseVector
from byzps.proto.v1 import bench_pb2
from byzps.proto.v1 import parameter_server_pb2 as pb


def make_update(k: int, density: float, seed: int = 0) -> SparseVector:
    rng = np.random.default_rng(seed)
    dim = max(k, round(k / density))
    idx = np.sort(rng.choice(dim, size=k, replace=False)).astype(np.int32)
    return SparseVector(
        torch.from_numpy(idx), torch.from_numpy(rng.standard_normal(k, dtype=np.float32)), dim
    )


def bytes_round_trip(vec: SparseVector) -> tuple[SparseVector, int]:
    wire = encode_sparse(vec, compressor="topk").SerializeToString()
    return decode_sparse(pb.SparseUpdate.FromString(wire)), len(wire)


def repeated_round_trip(vec: SparseVector) -> tuple[SparseVector, int]:
    msg = bench_pb2.RepeatedSparseUpdate(
        dim=vec.dim,
        nnz=vec.nnz,
        indices=vec.indices.numpy().tolist(),
        values=vec.values.numpy().tolist(),
    )
    wire = msg.SerializeToString()
    back = bench_pb2.RepeatedSparseUpdate.FromString(wire)
    indices = torch.from_numpy(np.array(back.indices, dtype=np.int32))
    values = torch.from_numpy(np.array(back.values, dtype=np.float32))
    return SparseVector(indices, values, back.dim), len(wire)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--density", type=float, default=0.01, help="k / d")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    print("$ python " + shlex.join(["benchmarks/bench_codec.py", *sys.argv[1:]]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, density {args.density}")
    header = (
        f"{'k':>9} {'bytes ms':>9} {'repeated ms':>12} {'ratio':>6} "
        f"{'bytes/(8k)':>11} {'repeated/(8k)':>14}"
    )
    print(header)
    for k in args.sizes:
        vec = make_update(k, args.density)
        for round_trip in (bytes_round_trip, repeated_round_trip):  # same data out as in
            out, _ = round_trip(vec)
            assert torch.equal(out.indices, vec.indices) and torch.equal(out.values, vec.values)
        t_bytes = median_ms(lambda v=vec: bytes_round_trip(v), args.repeats)
        t_rep = median_ms(lambda v=vec: repeated_round_trip(v), args.repeats)
        size_bytes = bytes_round_trip(vec)[1] / (8 * k)
        size_rep = repeated_round_trip(vec)[1] / (8 * k)
        print(
            f"{k:>9} {t_bytes:>9.2f} {t_rep:>12.2f} {t_rep / t_bytes:>6.1f} "
            f"{size_bytes:>11.4f} {size_rep:>14.4f}"
        )


if __name__ == "__main__":
    main()
