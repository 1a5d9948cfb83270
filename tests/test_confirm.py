"""`byzps confirm`: stage 2 of a two-stage study runs each row's chosen setting on new seeds, and
the report then reads the two stages exactly as if every setting had run on every seed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_sweep import sweep_in_process, write_grid

from byzps.cli.main import main
from byzps.common.config import RunConfig
from byzps.sim.grid import expand, load_grid

#: Stage 1: 3 methods × 2 attacks (6 rows) × 3 lrs (× 2 η for Byz-DM21) on the selection seed 0;
#: one method carries a table-valued setting, which stage 2 must write back as it was.
STAGE_ONE = """
base = "base.toml"
[fixed]
"run.eval_every" = 10
[axes]
"algorithm.name" = [
  { "algorithm.name" = "byz-dm21", "algorithm.eta" = 0.5 },
  { "algorithm.name" = "byz-dm21", "algorithm.eta" = 0.1 },
  { "algorithm.name" = "br-csgd", "compressor.name" = "randk" },
  { "algorithm.name" = "byz-ef21", "algorithm.params" = { stochastic = true } },
]
"attack.name" = [{ "attack.name" = "na", "cluster.workers" = 3, "cluster.byzantine" = 1 }, "sf"]
"algorithm.lr" = [0.2, 0.05, 0.005]
"run.seed" = [0]
"""

SELECT = ["--metric", "train_loss", "--tune", "algorithm.eta", "--selection-seeds", "0"]


def confirm(out: Path, grid: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["confirm", str(out), "--grid", str(grid), *SELECT, *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    grid = write_grid(root, STAGE_ONE)
    code, output = sweep_in_process(grid, root / "runs")
    assert code == 0, output
    return grid, root / "runs"


def linked_cells(runs: Path, folder: Path) -> Path:
    """A sweep directory of links to `runs`' cells (the shared stage 1 stays untouched)."""
    folder.mkdir()
    for cell in runs.iterdir():
        if cell.is_dir():
            (folder / cell.name).symlink_to(cell)
    return folder


def unseeded(config: RunConfig) -> dict[str, Any]:
    data = config.to_dict()
    del data["run"]["seed"]
    return data


def best_by_hand(runs: Path, over_run: bool = False) -> dict[tuple[str, str], tuple[float, float]]:
    """(method, attack) → (lr, η) of the lowest train loss on seed 0 (final, or the lowest
    reached over the run), read from the files."""
    best: dict[tuple[str, str], tuple[float, tuple[float, float]]] = {}
    for path in runs.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        config, loss = summary["config"], summary["final"]["train_loss"]
        if over_run and math.isfinite(loss) and not summary["final"].get("diverged"):
            curve = (path.parent / "metrics.jsonl").read_text().splitlines()
            loss = min(json.loads(line)["train_loss"] for line in curve)
        elif not math.isfinite(loss) or summary["final"].get("diverged"):
            loss = math.inf  # a run that blew up is never chosen, whatever it reached before
        if config["run"]["seed"] != 0:
            continue
        row = (config["algorithm"]["name"], config["attack"]["name"])
        setting = (config["algorithm"]["lr"], config["algorithm"]["eta"])
        if row not in best or (loss, setting) < best[row]:  # ties: the smaller setting
            best[row] = (loss, setting)
    return {row: setting for row, (_, setting) in best.items()}


def test_stage_two_reruns_each_rows_chosen_cell_on_new_seeds(
    stage_one: tuple[Path, Path], tmp_path: Path
) -> None:
    grid, runs = stage_one
    out = tmp_path / "confirm.toml"
    code, output = confirm(runs, grid, "--seed", "1", "--seed", "2", "--out", str(out))
    assert code == 0, output
    assert "6 rows chosen" in output
    cells = expand(load_grid(out))
    assert sorted({c.config.run.seed for c in cells}) == [1, 2]
    chosen = {
        (c.config.algorithm.name, c.config.attack.name): (
            c.config.algorithm.lr,
            c.config.algorithm.eta,
        )
        for c in cells
    }
    assert chosen == best_by_hand(runs)
    # Each stage-2 cell is a stage-1 cell with another seed: every other key the same.
    stage_one_configs = [unseeded(c.config) for c in expand(load_grid(grid))]
    assert all(unseeded(cell.config) in stage_one_configs for cell in cells)


def test_select_by_best_reads_the_curves(stage_one: tuple[Path, Path], tmp_path: Path) -> None:
    grid, runs = stage_one
    out = tmp_path / "confirm.toml"
    code, output = confirm(runs, grid, "--select-by", "best", "--seed", "1", "--out", str(out))
    assert code == 0, output
    chosen = {
        (c.config.algorithm.name, c.config.attack.name): (
            c.config.algorithm.lr,
            c.config.algorithm.eta,
        )
        for c in expand(load_grid(out))
    }
    assert chosen == best_by_hand(runs, over_run=True)


def test_the_report_reads_both_stages_and_shows_only_the_new_seeds(
    stage_one: tuple[Path, Path], tmp_path: Path
) -> None:
    grid, runs = stage_one
    both = linked_cells(runs, tmp_path / "runs")
    shutil.copy(runs / "grid.json", both / "grid.json")  # stage 1's record
    out = tmp_path / "confirm.toml"
    assert confirm(both, grid, "--seed", "1", "--seed", "2", "--out", str(out))[0] == 0
    # Before stage 2 ran, the report refuses, or with --partial lists every row as pending.
    report_cmd = ["report", str(both), "--out", str(tmp_path / "early"), *SELECT]
    early = CliRunner().invoke(main, report_cmd)
    assert early.exit_code != 0 and "has no other seed" in early.output
    early = CliRunner().invoke(main, [*report_cmd, "--partial"])
    assert early.exit_code == 0, early.output
    assert "6 rows left out" in early.output
    text = (tmp_path / "early" / "report.md").read_text()
    assert "**Not in the tables (6 rows):**" in text and "byz-dm21 under sf with nnm+cm" in text
    code, output = sweep_in_process(out, both)
    assert code == 0, output
    result = CliRunner().invoke(main, ["report", str(both), "--out", str(tmp_path / "r"), *SELECT])
    assert result.exit_code == 0, result.output
    assert "6 rows from 12 runs" in result.output  # 6 rows × seeds 1, 2; seed 0 only chose
    report = (tmp_path / "r" / "report.md").read_text()
    # Both stages' records are kept, and the report names both sweeps in the order they ran.
    assert json.loads((both / "grid.json").read_text())["grid"] == str(grid.resolve())
    assert json.loads((both / "grid.confirm.json").read_text())["grid"] == str(out.resolve())
    first, second = report.index(f"--grid {grid}"), report.index(f"--grid {out}")
    assert first < second < report.index("byzps report")
    # The summary: a methods × attacks matrix per aggregator, each cell with its chosen setting.
    summary = report.split("## Summary")[1].split("## attack")[0]
    header = next(ln for ln in summary.splitlines() if ln.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for (method, attack), (lr, eta) in best_by_hand(runs).items():
        line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {method}"))
        cell = [c.strip() for c in line.strip("|").split("|")][columns.index(attack)]
        assert cell.endswith(f"(lr {lr:g}, eta {eta:g})"), (method, attack, cell)
    for (method, attack), (lr, eta) in best_by_hand(runs).items():
        table = report.split(f"## attack: {attack}")[1].split("## ")[0]
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {method} "))
        assert f"| lr {lr:g}, eta {eta:g} (of " in line, (method, attack, line)
        assert line.endswith("| 2 |"), line  # seeds 1 and 2


def test_a_row_with_a_missing_selection_run_waits(
    stage_one: tuple[Path, Path], tmp_path: Path
) -> None:
    grid, runs = stage_one
    partial = linked_cells(runs, tmp_path / "runs")
    next(p for p in sorted(partial.iterdir()) if p.is_dir()).unlink()  # one stage-1 run missing
    out = tmp_path / "confirm.toml"
    code, output = confirm(partial, grid, "--seed", "1", "--out", str(out))
    assert code == 0, output
    assert "5 rows chosen; 1 rows still wait for stage-1 runs" in output
    assert len(expand(load_grid(out))) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "0"], "seeds: 0 is a selection seed"),
        (["--seed", "1", "--tune", "run.seed"], "run.seed is what settings are averaged over"),
    ],
)
def test_bad_requests_are_refused_naming_the_option(
    stage_one: tuple[Path, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    grid, runs = stage_one
    out = tmp_path / "confirm.toml"
    code, output = confirm(runs, grid, *args, "--out", str(out))
    assert code != 0 and message in output, output
    assert not out.exists()


def test_choosing_needs_selection_seeds(stage_one: tuple[Path, Path], tmp_path: Path) -> None:
    grid, runs = stage_one
    result = CliRunner().invoke(
        main,
        ["confirm", str(runs), "--grid", str(grid), "--seed", "1", "--out", str(tmp_path / "c")],
    )
    assert result.exit_code != 0 and "selection seeds: at least one" in result.output
