"""experiments/fmnist/run-study.sh, the resumable two-stage study, on a tiny a9a grid: both stages
and the report in one go, and a second machine that starts from the kept cells runs none of them
again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from configs import small_config, to_toml

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "fmnist" / "run-study.sh"

#: Stage 1: two step sizes on the selection seed 0 (the script's stage 2 runs seeds 1–3).
GRID = """
base = "base.toml"
[fixed]
"run.eval_every" = 5
[axes]
"algorithm.lr" = [0.5, 0.05]
"run.seed" = [0]
"""


def run_study(out: Path, grid: Path, raw: Path, report: Path) -> None:
    env = os.environ | {
        "GRID": str(grid), "RAW": str(raw), "REPORT": str(report), "JOBS": "1",
        # the interpreter's own scripts first, so `byzps` is this environment's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def cells(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}


@pytest.mark.slow  # five short runs, each a new interpreter
def test_the_study_script_runs_both_stages_and_resumes_from_kept_cells(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text(to_toml(small_config(seed=0, rounds=10)))
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    empty = tmp_path / "kept-none"
    empty.mkdir()

    first = tmp_path / "first"
    run_study(first, grid, empty, tmp_path / "report-1")
    done = cells(first)
    seeds = sorted(s["config"]["run"]["seed"] for s in done.values())
    assert seeds == [0, 0, 1, 2, 3], seeds  # two step sizes on seed 0, the chosen one on 1–3
    report = (tmp_path / "report-1" / "report.md").read_text()
    assert "chosen on seeds 0 only" in report

    # Another machine keeps only what the repo holds of each cell, and runs nothing again.
    kept = tmp_path / "kept"
    for name in done:
        (kept / name).mkdir(parents=True)
        for file in ("summary.json", "metrics.jsonl"):
            shutil.copy(first / name / file, kept / name / file)
    second = tmp_path / "second"
    run_study(second, grid, kept, tmp_path / "report-2")
    assert cells(second) == done
    assert not list(second.glob("*/params.npy")), "a kept cell was run again"
    assert (tmp_path / "report-2" / "report.md").read_text().split("Regenerate")[0] == (
        report.split("Regenerate")[0]
    )
