"""`byzps sweep`: grid expansion and naming, up-front validation, resumption by config digest."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cluster_helpers import wait_for
from configs import small_config, to_toml

from byzps.cli.main import main
from byzps.common.catalog import check_components
from byzps.sim.grid import (
    GridError,
    cell_name,
    expand,
    load_grid,
    plan_batches,
    run_batch_of_cells,
)


def base_toml(**overrides: Any) -> str:
    """The grid's base run: seed 0, 30 rounds, lr 0.05, Top-1 (`overrides` change the rest)."""
    return to_toml(small_config(seed=0, rounds=30, eval_every=10, lr=0.05, **overrides))


BASE = base_toml()

#: 2 methods × 2 seeds; br-csgd needs an unbiased compressor, so it is linked to Rand-k.
TINY_GRID = """
base = "base.toml"
[fixed]
"run.eval_every" = 10
[axes]
"algorithm.name" = ["byz-dm21", { "algorithm.name" = "br-csgd", "compressor.name" = "randk" }]
"run.seed" = [0, 1]
"""


def write_grid(folder: Path, grid: str = TINY_GRID, base: str = BASE) -> Path:
    """A grid file and its base config in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(base)
    path = folder / "grid.toml"
    path.write_text(grid)
    return path


def sweep_in_process(grid: Path, out: Path) -> tuple[int, str]:
    """The CLI without a new interpreter (exit code, stdout + stderr)."""
    result = CliRunner().invoke(main, ["sweep", "--grid", str(grid), "--out", str(out)])
    return result.exit_code, result.output


def summaries(out: Path) -> dict[str, float]:
    """Cell name → modification time of its summary.json."""
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(out.glob("*/summary.json"))}


# -- grid expansion ----------------------------------------------------------------------------


def test_product_linked_keys_fixed_overrides_and_names(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path,
        """
base = "base.toml"
[fixed]
"run.rounds" = 7
attack.name = "ipm"
[axes]
"algorithm.name" = ["byz-dm21", { "algorithm.name" = "br-csgd", "compressor.name" = "randk" }]
"aggregator.name" = ["cm", "cwtm"]
"run.seed" = [0, 1, 2]
""",
    )
    cells = expand(load_grid(grid), check_components)
    assert len(cells) == 2 * 2 * 3
    assert all(c.config.run.rounds == 7 and c.config.attack.name == "ipm" for c in cells)
    compressors = {(c.config.algorithm.name, c.config.compressor.name) for c in cells}
    assert compressors == {("byz-dm21", "topk"), ("br-csgd", "randk")}
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    assert names == [c.name for c in expand(load_grid(grid))]  # deterministic
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in names)
    assert any(n.startswith("br-csgd_randk_cwtm_seed2-") for n in names)


def test_names_are_safe_and_distinct_for_values_that_slug_alike() -> None:
    a, b = cell_name({"task.name": "a/b"}), cell_name({"task.name": "a b"})
    assert a != b
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in (a, b))
    assert cell_name({"algorithm.lr": 0.5}).startswith("lr0.5-")


def test_every_bad_cell_is_named_with_its_key_before_anything_runs(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path,
        """
base = "base.toml"
[axes]
"compressor.k" = [1, 0]
"attack.name" = ["alie", "no-such-attack"]
""",
    )
    with pytest.raises(GridError) as info:
        expand(load_grid(grid), check_components)
    message = str(info.value)
    assert "3 bad cell(s)" in message
    assert message.count("compressor.k") == 2 and "attack" in message
    code, output = sweep_in_process(grid, tmp_path / "out")
    assert code != 0 and "compressor.k" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("grid", "key"),
    [
        ('base = "base.toml"\n[axes]\n"lr" = [0.1]\n', "axes.lr"),
        ('base = "base.toml"\n[axes]\n"algorithm.lr" = []\n', "axes.algorithm.lr"),
        ('base = "base.toml"\nrounds = 3\n', "rounds"),
        (
            'base = "base.toml"\n[axes]\n"algorithm.name" = [{"algorithm.name" = "br-csgd"}]\n'
            '"algorithm.lr" = [{"algorithm.lr" = 0.1, "algorithm.name" = "byz-ef21"}]\n',
            "algorithm.name",
        ),
    ],
)
def test_malformed_grid_names_the_grid_key(tmp_path: Path, grid: str, key: str) -> None:
    with pytest.raises(GridError, match=re.escape(key)):
        load_grid(write_grid(tmp_path, grid))


# -- running and resuming ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid, swept once by the real CLI in two spawned worker processes."""
    root = tmp_path_factory.mktemp("sweep")
    grid = write_grid(root)
    args = [sys.executable, "-m", "byzps.cli.main", "sweep", "--grid", str(grid)]
    args += ["--out", str(root / "out"), "--jobs", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "4 run, 0 skipped, 0 failed" in done.stdout
    return root


def copy_of(swept: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the swept folder (grid file, base and out), for tests that change it."""
    shutil.copytree(swept, tmp_path / "s")
    return tmp_path / "s" / "grid.toml", tmp_path / "s" / "out"


def test_sweep_writes_every_cell_and_grid_json(swept: Path) -> None:
    out = swept / "out"
    cells = expand(load_grid(swept / "grid.toml"))
    manifest = json.loads((out / "grid.json").read_text())
    assert [c["name"] for c in manifest["cells"]] == [c.name for c in cells]
    assert manifest["command"][:2] == ["byzps", "sweep"]
    for cell in cells:
        summary = json.loads((out / cell.name / "summary.json").read_text())
        assert summary["config_digest"] == cell.config.digest()
        assert summary["rounds"] == 30
        assert (out / cell.name / "metrics.jsonl").read_text().count("\n") == 4


def test_second_invocation_skips_every_cell(swept: Path, tmp_path: Path) -> None:
    grid, out = copy_of(swept, tmp_path)
    before = summaries(out)
    code, output = sweep_in_process(grid, out)
    assert code == 0, output
    assert "0 run, 4 skipped, 0 failed" in output
    assert output.count("skipped ") == 4
    assert summaries(out) == before


def test_a_partial_cell_alone_is_rerun(swept: Path, tmp_path: Path) -> None:
    grid, out = copy_of(swept, tmp_path)
    before = summaries(out)
    victim = sorted(before)[0]
    (out / victim / "summary.json").unlink()
    (out / victim / "metrics.jsonl").write_text("garbage from an interrupted run\n")
    (out / victim / "leftover.tmp").write_text("")
    code, output = sweep_in_process(grid, out)
    assert code == 0, output
    assert "1 run, 3 skipped, 0 failed" in output
    after = summaries(out)
    assert {n for n in before if after[n] != before[n]} == {victim}
    assert "garbage" not in (out / victim / "metrics.jsonl").read_text()
    assert not (out / victim / "leftover.tmp").exists()  # rerun from scratch


def test_a_config_change_reruns_its_cells(swept: Path, tmp_path: Path) -> None:
    grid, out = copy_of(swept, tmp_path)
    before = summaries(out)
    (grid.parent / "base.toml").write_text(base_toml(eta=0.2))
    code, output = sweep_in_process(grid, out)
    assert code == 0, output
    assert "4 run, 0 skipped, 0 failed" in output
    after = summaries(out)
    assert all(after[n] != before[n] for n in before)
    configs = [json.loads((out / n / "summary.json").read_text())["config"] for n in after]
    assert {c["algorithm"]["eta"] for c in configs} == {0.2}


def test_a_failing_cell_is_reported_and_the_others_finish(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path,
        'base = "base.toml"\n[fixed]\n"run.rounds" = 3\n[axes]\n"compressor.k" = [1, 1000]\n',
    )
    code, output = sweep_in_process(grid, tmp_path / "out")
    assert code == 1
    assert "1 run, 0 skipped, 1 failed" in output
    assert re.search(r"failed +k1000-\w+: .*compressor", output)
    assert len(summaries(tmp_path / "out")) == 1


def test_batched_and_unbatched_sweeps_write_the_same_runs(swept: Path, tmp_path: Path) -> None:
    """The fixture's sweep ran its 2 seeds per method as batches of 2 (the default --batch);
    every cell alone (--batch 1) gives the same records and parameters, bit for bit."""
    grid = swept / "grid.toml"
    result = CliRunner().invoke(
        main, ["sweep", "--grid", str(grid), "--out", str(tmp_path / "alone"), "--batch", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "(batch of" not in result.output
    for cell in expand(load_grid(grid)):
        for name in ("params.npy", "metrics.jsonl"):
            batched = (swept / "out" / cell.name / name).read_bytes()
            alone = (tmp_path / "alone" / cell.name / name).read_bytes()
            if name == "metrics.jsonl":  # wall times differ
                batched, alone = (
                    re.sub(rb'"wall_seconds": [0-9.e-]+', b"", t) for t in (batched, alone)
                )
            assert batched == alone, (cell.name, name)


def test_batches_group_cells_that_differ_only_in_seed_and_lr(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path,
        """
base = "base.toml"
[axes]
"algorithm.name" = [
  "byz-dm21",
  { "algorithm.name" = "byz-dasha-page", "compressor.name" = "randk" },
  { "algorithm.name" = "byz-vr-marina", "compressor.name" = "randk" },
]
"algorithm.lr" = [0.5, 0.05]
"run.seed" = [0, 1, 2]
""",
    )
    cells = expand(load_grid(grid))
    batches = plan_batches(cells, 4)
    methods = [{c.config.algorithm.name for c in batch} for batch in batches]
    assert all(len(m) == 1 for m in methods)  # never two methods in a batch
    sizes = {name: sorted(len(b) for b, m in zip(batches, methods, strict=True) if m == {name})
             for name in ("byz-dm21", "byz-dasha-page", "byz-vr-marina")}  # fmt: skip
    assert sizes["byz-dm21"] == [3, 3]  # 6 cells, at most 4 a batch, cut evenly
    assert sizes["byz-dasha-page"] == [2, 2, 2]  # a run-wide coin: one seed per batch
    assert sizes["byz-vr-marina"] == [1] * 6  # its server rule reads the aggregate
    assert sorted(c.name for b in batches for c in b) == sorted(c.name for c in cells)
    assert all(len(b) == 1 for b in plan_batches(cells, 1))


def test_batches_are_cut_evenly_and_fill_the_jobs(tmp_path: Path) -> None:
    """17 seeds of one cell at --batch 16 make batches of 9 and 8 (not 16 and 1); with more
    jobs than batches, the batches are cut further, evenly, down to one run each; cells that
    cannot share a batch stay alone; no cell is lost or repeated and grid order is kept."""
    grid = write_grid(
        tmp_path,
        """
base = "base.toml"
[axes]
"run.seed" = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
""",
    )
    cells = expand(load_grid(grid))

    def sizes(batches: list[list], planned: list = cells) -> list[int]:
        assert [c.name for b in batches for c in b] == [c.name for c in planned]  # order, once
        return [len(b) for b in batches]

    assert sizes(plan_batches(cells, 16)) == [9, 8]
    assert sizes(plan_batches(cells, 16, jobs=2)) == [9, 8]
    assert sizes(plan_batches(cells, 16, jobs=3)) == [6, 6, 5]
    assert sizes(plan_batches(cells, 4, jobs=2)) == [4, 4, 3, 3, 3]
    assert sizes(plan_batches(cells[:3], 16, jobs=8), cells[:3]) == [1, 1, 1]
    assert sizes(plan_batches(cells, 1, jobs=4)) == [1] * 17
    assert plan_batches([], 16, jobs=4) == []


def test_a_batch_that_fails_falls_back_to_its_cells_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import byzps.sim.batched as batched

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(batched, "build_batched_simulation", broken)
    cells = [c for c in expand(load_grid(write_grid(tmp_path))) if "dm21" in c.name]
    outcomes = run_batch_of_cells(cells, tmp_path / "out")
    assert [o.status for o in outcomes] == ["run", "run"] and {o.batch for o in outcomes} == {1}
    assert "batch failed (RuntimeError: boom); alone:" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """The PIDs `pid` started (Linux /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (an orphan's new parent may be slow to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(
    not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
    reason="needs Linux /proc/<pid>/task/<tid>/children to find the sweep's pool",
)
def test_a_sweep_killed_with_sigkill_takes_its_pool_workers_with_it(tmp_path: Path) -> None:
    """Killed with SIGKILL, a sweep cannot stop its pool: each worker notices its parent is gone
    and exits within seconds, releasing its cell's lock, instead of running cells no one reads
    and refusing them to the next sweep (an orphaned worker used to run to the end)."""
    from byzps.cli.sweep import PARENT_CHECK_SECONDS
    from byzps.common.runlock import RunLock

    endless = TINY_GRID.replace("[fixed]", '[fixed]\n"run.rounds" = 100000000')
    grid = write_grid(tmp_path, endless)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "byzps.cli.main", "sweep", "--grid", str(grid)]
    args += ["--out", str(out), "--jobs", "2", "--batch", "1"]
    sweep = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        locks = wait_for(lambda: len(list(out.glob("*.lock"))) >= 2 and list(out.glob("*.lock")),
                         120, "two cells running")  # fmt: skip
        workers = [pid for pid in _children(sweep.pid) if _running(pid)]
    finally:
        sweep.kill()
        sweep.wait(timeout=10)
    assert len(workers) >= 2, workers  # the pool's two workers (and spawn's resource tracker)
    try:
        wait_for(lambda: not any(_running(pid) for pid in workers),
                 10 * PARENT_CHECK_SECONDS + 10, "the orphaned pool workers to exit")  # fmt: skip
    finally:  # never leave them running, even when the test fails
        for pid in filter(_running, workers):
            os.kill(pid, signal.SIGKILL)
    for lock in locks:  # each cell is free for the next sweep
        RunLock(out, lock.name.removesuffix(".lock")).release()
