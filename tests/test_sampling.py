"""The authors' protocol as options: `task.sampling` ("replace" | "shuffle"), `task.split_over`
("all" | "honest"), the DataSpec that carries them, and the paper experiments that use them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from configs import small_config

from byzps.common.catalog import check_components
from byzps.common.components import build_run_task, run_data_spec
from byzps.common.config import ConfigError, RunConfig
from byzps.common.tasks import DataSpec
from byzps.common.tasks.a9a import A9aLogRegTask
from byzps.common.tasks.sampling import ShardBatches, ShuffledShardBatches, shard_batches
from byzps.sim.build import build_simulation
from byzps.sim.grid import expand, load_grid

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def shuffled(sizes: list[int], batch_size: int, ids: list[int] | None = None, seed: int = 7):
    """A shuffle sampler over synthetic shards: worker row r holds rows 1000·r … (disjoint)."""
    shards = [torch.arange(size) + 1000 * row for row, size in enumerate(sizes)]
    ids = list(range(len(sizes))) if ids is None else ids
    return ShuffledShardBatches(shards, ids, seed, batch_size)


def stream(sampler: ShuffledShardBatches, rounds: int) -> torch.Tensor:
    """(w, rounds · b): every worker's rows of rounds 0 … rounds − 1, in order."""
    return torch.cat([sampler.sample(t) for t in range(rounds)], dim=1)


# ---------------------------------------------------------------- shuffle sampling


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
def test_shuffle_draws_every_row_once_per_pass(batch_size: int) -> None:
    sizes = [10, 7, 13]
    sampler = shuffled(sizes, batch_size)
    rows = stream(sampler, math.ceil(3 * max(sizes) / batch_size))
    for r, size in enumerate(sizes):
        shard = torch.arange(size) + 1000 * r
        passes = rows[r, : 3 * size].reshape(3, size)
        for p in passes:  # each pass is a permutation of the shard: no repeats, nothing left out
            assert torch.equal(p.sort().values, shard)
        assert not torch.equal(passes[0], passes[1]) or not torch.equal(passes[1], passes[2])


def test_shuffle_reshuffles_every_pass() -> None:
    sampler = shuffled([50], 5)
    passes = stream(sampler, 30)[0].reshape(3, 50)
    assert not torch.equal(passes[0], passes[1]) and not torch.equal(passes[1], passes[2])


def test_a_batch_straddling_a_pass_takes_the_tail_and_the_head() -> None:
    sampler = shuffled([10], 4)
    epoch0, epoch1 = sampler.epoch_rows(0, 0), sampler.epoch_rows(0, 1)
    # round 2 reads positions 8 … 11: rows 8, 9 of pass 0, then rows 0, 1 of pass 1
    assert torch.equal(sampler.sample(2)[0], torch.cat([epoch0[8:], epoch1[:2]]))
    assert torch.equal(sampler.sample(3)[0], epoch1[2:6])
    # a batch larger than the shard spans three passes
    big = shuffled([3], 7)
    expected = torch.cat([big.epoch_rows(0, e) for e in range(5)])[7:14]
    assert torch.equal(big.sample(1)[0], expected)


def test_shuffle_is_a_pure_function_of_seed_worker_and_round() -> None:
    """A daemon restarted at round t draws what one that walked 0 … t draws, in any order."""
    walked = shuffled([10, 7, 13], 4)
    history = [walked.sample(t) for t in range(12)]
    for t in (11, 3, 0, 7, 7, 5):
        restarted = shuffled([10, 7, 13], 4)
        assert torch.equal(restarted.sample(t), history[t])
        assert torch.equal(walked.sample(t), history[t])  # going back to an earlier pass
    assert not torch.equal(shuffled([10, 7, 13], 4, seed=8).sample(0), history[0])


def test_shuffle_rows_depend_on_the_worker_id_not_on_the_other_rows() -> None:
    together = shuffled([10, 10, 10], 3, ids=[4, 9, 2])
    alone = shuffled([10], 3, ids=[9])  # same shard contents as row 0 above, id 9
    for t in range(9):
        own = alone.sample(t)[0]
        assert torch.equal(together.sample(t)[1] - 1000, own)
    assert not torch.equal(stream(shuffled([10], 3, ids=[4]), 9), stream(alone, 9))


def test_the_factory_names_the_samplers_and_refuses_others() -> None:
    shards, ids = [torch.arange(5)], [0]
    assert isinstance(shard_batches("replace", shards, ids, 0, 2), ShardBatches)
    assert isinstance(shard_batches("shuffle", shards, ids, 0, 2), ShuffledShardBatches)
    with pytest.raises(ValueError, match="sampling must be one of replace, shuffle"):
        shard_batches("bootstrap", shards, ids, 0, 2)
    with pytest.raises(ValueError, match="non-negative"):
        shuffled([5], 1).sample(-1)


def a9a_config(**task: object) -> RunConfig:
    data = small_config(workers=20, byzantine=8, attack="lf")
    data["task"] |= {"batch_size": 64} | task
    return RunConfig.from_dict(data)


def test_a9a_daemon_draws_what_the_simulator_draws_for_it() -> None:
    """w = 1 (a worker daemon or cohort member, its own task object) vs w = n (the simulator),
    across several passes: a9a shards of ~2 700 rows and batch 64 straddle a pass every ~42
    rounds."""
    config = a9a_config(sampling="shuffle", split_over="honest")
    sim = build_simulation(config)
    daemon_task = build_run_task(config)  # another process builds its own task
    rounds = [0, 1, 41, 42, 43, 85, 130]
    for t in rounds:
        honest, byzantine = sim.honest_oracle.sample(t), sim.cohort_oracle.sample(t)
        for worker in (0, 5, 11):
            assert torch.equal(daemon_task.oracle([worker], 3).sample(t)[0], honest[worker])
        for member, worker in enumerate(range(12, 20)):
            alone = daemon_task.oracle([worker], 3, flip_labels=True).sample(t)[0]
            assert torch.equal(alone, byzantine[member])


def test_a9a_shuffle_covers_each_shard_once_per_pass() -> None:
    task = A9aLogRegTask(data=DataSpec(num_workers=20, seed=0, batch_size=50, sampling="shuffle"))
    oracle = task.oracle([3], seed=1)
    shard = task.shards[3]
    rows = torch.cat([oracle.sample(t)[0] for t in range(math.ceil(shard.numel() / 50))])
    assert torch.equal(rows[: shard.numel()].sort().values, shard)


# ---------------------------------------------------------------- split over the honest workers


def test_data_spec_maps_byzantine_ids_to_honest_shards() -> None:
    spec = DataSpec(num_workers=20, seed=0, split_over="honest", honest_workers=12)
    assert spec.shard_count == 12
    assert [spec.shard_of(j) for j in (0, 11, 12, 19)] == [0, 11, 0, 7]
    everyone = DataSpec(num_workers=20, seed=0, honest_workers=12)
    assert everyone.shard_count == 20 and everyone.shard_of(19) == 19
    assert DataSpec(num_workers=5, seed=0, split_over="honest").shard_count == 5
    with pytest.raises(ValueError, match="outside"):
        spec.shard_of(20)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sampling": "bootstrap"}, "sampling"),
        ({"split_over": "byzantine"}, "split_over"),
        ({"honest_workers": 0}, "honest_workers"),
        ({"honest_workers": 6}, "honest_workers"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": 0}, "num_workers"),
    ],
)
def test_data_spec_refuses_bad_fields_naming_them(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataSpec(**({"num_workers": 5, "seed": 0} | fields))


def test_honest_split_gives_the_honest_workers_all_of_a9a() -> None:
    config = a9a_config(split_over="honest")
    assert run_data_spec(config).honest == 12
    task = build_run_task(config)
    shards = task.worker_shards(range(12))
    every = torch.cat(shards).sort().values
    assert torch.equal(every, torch.arange(task.features.shape[0]))  # disjoint and covering
    byzantine = task.worker_shards(range(12, 20))
    assert all(torch.equal(b, shards[j]) for j, b in enumerate(byzantine))
    # the same shards the honest workers of a run without Byzantine ids get (the "na" cells)
    alone = build_run_task(RunConfig.from_dict(small_config(workers=12, byzantine=5, attack="na")))
    assert all(
        torch.equal(a, s) for a, s in zip(alone.worker_shards(range(12)), shards, strict=True)
    )
    # the default still deals all n ids a shard of their own
    assert len(build_run_task(a9a_config()).shards) == 20


def test_label_flip_members_train_on_flipped_honest_rows() -> None:
    config = a9a_config(split_over="honest", sampling="shuffle")
    task = build_run_task(config)
    flipped = task.oracle([13], 3, flip_labels=True)
    honest = task.oracle([1], 3)
    batch = flipped.sample(0)
    assert torch.isin(batch[0], task.shards[1]).all()  # member 13 draws from honest shard 1
    assert not torch.equal(batch, honest.sample(0))  # with batches of its own
    x = torch.randn(123)
    from byzps.common.tasks.a9a import LogisticOracle

    assert isinstance(flipped, LogisticOracle) and isinstance(honest, LogisticOracle)
    assert not torch.allclose(flipped.grad(x, batch), honest.grad(x, batch))


def test_a_short_label_flip_run_under_the_authors_protocol_stays_finite() -> None:
    data = small_config(workers=20, byzantine=8, attack="lf", rounds=30)
    data["task"] |= {"sampling": "shuffle", "split_over": "honest"}
    sim = build_simulation(RunConfig.from_dict(data))
    for _ in range(30):
        sim.step()
    assert torch.isfinite(sim.x).all() and sim.x.abs().sum() > 0


# ---------------------------------------------------------------- the paper experiments


@pytest.mark.parametrize(
    ("grid_file", "f", "na_f"),
    [("a9a/grid.toml", 8, 5), ("a9a/study.toml", 8, 5), ("fmnist/grid.toml", 8, 5),
     ("fmnist/study.toml", 8, 5), ("catalogue/grid.toml", 4, 3)],
)  # fmt: skip
def test_paper_experiments_use_the_authors_protocol(grid_file: str, f: int, na_f: int) -> None:
    """Shuffled batches, data over the honest workers, and "na" with the n − f honest workers
    alone, the rule declared with the largest f every rule of the grid takes on them (5 of 12
    for a majority; 3 of 16 for the catalogue's Bulyan, which needs 4f + 3 ≤ n)."""
    grid = load_grid(EXPERIMENTS / grid_file)
    cells = expand(grid, check_components)
    for cell in cells:
        config = cell.config
        assert (config.task.sampling, config.task.split_over) == ("shuffle", "honest")
        assert config.honest_workers == 20 - f
        if config.attack.name == "na":
            assert (config.cluster.workers, config.cluster.byzantine) == (20 - f, na_f)
        else:
            assert (config.cluster.workers, config.cluster.byzantine) == (20, f)
    assert {c.config.attack.name for c in cells} >= {"na", "alie"}


def test_unknown_sampling_and_split_over_are_refused_naming_the_key() -> None:
    for key, value in (("sampling", "without"), ("split_over", "byzantine")):
        data = small_config()
        data["task"][key] = value
        with pytest.raises(ConfigError, match=rf"^task\.{key}: unknown {key} '{value}'"):
            RunConfig.from_dict(data)
