"""Perm-K at the server's door: its check against a whole-permutation baseline, in one run.

Usage:  python benchmarks/bench_permk.py [--dims 1000000 10000000] [--workers 20] [--repeats 3]

For each d, one round's n honest Perm-K pushes (d/n entries each) and two forged ones, all checked
by `Door.receive` as the server checks them (decode, then seed and block):
- honest: the n pushes of one round (`is_permk_block`, π⁻¹ index by index);
- forged seed: the last worker's block under another seed (refused by the seed alone);
- forged block: the round's seed, the last worker's block with its last index moved (refused
  after the whole pass, the dearest refusal a forger can buy);
and the baseline: what a block check costs through the whole permutation, `torch.randperm(d)`
per message (how any shuffle-drawn permutation has to find a block far into it). Medians of
`--repeats` calls in milliseconds; ratios > 1 mean the door is cheaper than the baseline.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from timing import median_ms

from byzps.common.codec import encode_update
from byzps.common.compressors import PermK, build_compressor
from byzps.common.sparse import SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.validation import Door, Rejected

RUN_SEED, ROUND = 3, 4


def refused(door: Door, row: int, update: pb.SparseUpdate) -> None:
    try:
        door.receive(row, ROUND, 1, update)
    except Rejected:
        return
    raise AssertionError("a forged Perm-K push was admitted")


def whole_permutation_check(comp: PermK, seed: int, row: int, update: pb.SparseUpdate) -> bool:
    """The baseline: the block read off the whole permutation, compared with the message's."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(comp.dim, generator=generator)
    start = row * comp.k
    block = torch.sort(perm[torch.arange(start, start + comp.k) % comp.dim]).values
    return block.numel() == update.nnz


def last_index_moved(vec: SparseVector) -> SparseVector:
    """`vec` with its last index moved to the next coordinate outside its block: still
    strictly increasing, so only the block check, at its last index, can refuse it."""
    indices = vec.indices.clone()
    taken = set(indices.tolist())
    low = int(indices[-2]) + 1 if indices.numel() > 1 else 0
    free = next((j for j in range(low, vec.dim) if j not in taken), None)
    if free is None:
        raise SystemExit("no coordinate to move the block's last index to")
    indices[-1] = free
    return SparseVector(indices, vec.values, vec.dim, vec.seed)


def measure(dim: int, n: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of the door's checks at `dim` and of the baseline (module doc)."""
    comp = build_compressor("permk", dim, num_workers=n)
    assert isinstance(comp, PermK)
    door = Door(dim, "permk", lambda r: comp.k, rounds=10, spec=comp, seed=RUN_SEED)
    seeds = comp.row_seeds(RUN_SEED, range(n), ROUND)
    batch = comp.compress(torch.randn(n, dim), seeds, list(range(n)))
    updates = [encode_update(v, comp) for v in batch.rows()]
    last = n - 1
    other_seed = pb.SparseUpdate()
    other_seed.CopyFrom(updates[last])
    other_seed.seed += 1
    forged_block = encode_update(last_index_moved(batch.row(last)), comp)

    def honest() -> None:
        for row, update in enumerate(updates):
            door.receive(row, ROUND, 1, update)

    return {
        "honest": median_ms(honest, repeats),
        "seed": median_ms(lambda: refused(door, last, other_seed), repeats),
        "block": median_ms(lambda: refused(door, last, forged_block), repeats),
        "baseline": median_ms(
            lambda: whole_permutation_check(comp, seeds[last], last, updates[last]), repeats
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    n = args.workers
    print("| d | n | honest round (n pushes) | forged seed | forged block | baseline, one push "
          "| baseline / forged block |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for dim in args.dims:
        times = measure(dim, n, args.repeats)
        print(f"| {dim:.0e} | {n} | {times['honest']:.1f} ms | {times['seed']:.2f} ms "
              f"| {times['block']:.1f} ms | {times['baseline']:.1f} ms "
              f"| {times['baseline'] / times['block']:.1f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
