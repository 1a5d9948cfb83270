"""Column-sharded aggregation (issue 12, item 1's core): S shards, each holding a contiguous range
of the coordinates and running the rule on its own columns, with only the O(n²) column
reductions (Gram, squared norms) summed between them, give what one aggregator gives on all
columns — for every rule and wrapper, on inputs with outliers and non-finite rows:

* coordinate-wise rules (mean, cm, cwtm, meamed, and nnm/bucketing over them) bit for bit;
* the others within float64 rounding of the Gram (1e-6 relative), with the same verdict
  (the same selection or weights) as the single aggregator;
* every shard takes the same decisions (the program stays in lockstep: no barrier times out).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from byzps.common.aggregators import AGGREGATORS, build_aggregator
from byzps.common.aggregators.collective import ThreadCollective, sharded
from byzps.common.aggregators.verdict import Weighted

N, F, D = 15, 3, 2003
COORDINATEWISE = {"mean", "cm", "cwtm", "meamed"}


def split(d: int, shards: int) -> list[int]:
    """Uneven contiguous column counts (the last shard the largest), summing to d."""
    base = d // (shards + 1)
    sizes = [base] * (shards - 1)
    return [*sizes, d - sum(sizes)]


def attacked_rows(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    x[-F:] += 6.0  # a colluding shift
    x[-1, 7] = float("inf")  # and one member with a non-finite coordinate
    return x


def run_sharded(name: str, pre: tuple[str, ...], x: torch.Tensor, shards: int) -> tuple:
    """Each shard, in its own thread, builds the rule and aggregates its columns; returns the
    concatenated output and every shard's verdict."""
    sizes = split(x.shape[1], shards)
    bounds = np.cumsum([0, *sizes])
    group = ThreadCollective.group(sizes, timeout=30.0)
    outputs: list[torch.Tensor | None] = [None] * shards
    verdicts: list[object] = [None] * shards
    errors: list[BaseException] = []

    def shard(rank: int) -> None:
        rule = build_aggregator(name, F, pre=pre, params=params_for(pre), n=N)
        try:
            with sharded(group[rank]):
                part = x[:, bounds[rank] : bounds[rank + 1]].contiguous()
                outputs[rank] = rule(part)
            verdicts[rank] = rule.last_verdict
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=shard, args=(r,)) for r in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return torch.cat(outputs), verdicts  # type: ignore[arg-type]


def params_for(pre: tuple[str, ...]) -> dict[str, float]:
    return {"c": 2.0} if "clip" in pre else {}


def _cases() -> list[tuple[str, tuple[str, ...]]]:
    every = [(name, ()) for name in sorted(AGGREGATORS.names())]
    return [*every, ("cm", ("nnm",)), ("cwtm", ("bucketing",)), ("krum", ("nnm",)),
            ("gm", ("nnm",)), ("cwtm", ("arc",)), ("mean", ("clip",))]  # fmt: skip


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize(("name", "pre"), _cases())
def test_sharded_aggregation_equals_one_aggregator(
    name: str, pre: tuple[str, ...], shards: int
) -> None:
    x = attacked_rows(seed=shards)
    single_rule = build_aggregator(name, F, pre=pre, params=params_for(pre), n=N)
    single = single_rule(x)
    got, verdicts = run_sharded(name, pre, x, shards)
    assert got.shape == single.shape
    if name in COORDINATEWISE and "arc" not in pre and "clip" not in pre:
        assert torch.equal(got.view(torch.int32), single.view(torch.int32))
    else:
        assert torch.allclose(got, single, rtol=1e-6, atol=1e-7), float((got - single).abs().max())
    if isinstance(single_rule.last_verdict, Weighted):
        for verdict in verdicts:  # the same selection or weights, on every shard
            assert isinstance(verdict, Weighted)
            assert np.allclose(verdict.weights, single_rule.last_verdict.weights, atol=1e-9)


def test_a_shard_that_never_arrives_breaks_the_barrier_instead_of_hanging() -> None:
    group = ThreadCollective.group([5, 5], timeout=0.5)
    with pytest.raises(threading.BrokenBarrierError):
        group[0].all_sum(np.ones(3))


def test_all_sum_adds_in_rank_order_on_every_shard() -> None:
    group = ThreadCollective.group([1, 1, 1])
    parts = [np.array([1e16]), np.array([1.0]), np.array([-1e16])]
    results: list[np.ndarray] = [np.zeros(1)] * 3

    def add(rank: int) -> None:
        results[rank] = group[rank].all_sum(parts[rank])

    threads = [threading.Thread(target=add, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # (1e16 + 1) − 1e16 in float64 is 0 (the 1 is lost), the same on every shard.
    assert [float(r[0]) for r in results] == [0.0, 0.0, 0.0]
