"""The claims sections of `byzps report`: intervals, plateaus, verdicts and the PL rate fit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_sweep import base_toml, write_grid

from byzps.sim import claims_report as claims
from byzps.sim.grid import expand, load_grid, run_cell
from byzps.sim.report import Objective, write_report


def test_t_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 29, 30, 31, 60, 1000):
        assert claims.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)
    with pytest.raises(ValueError, match="df >= 1"):
        claims.t975(0)


def test_interval_is_mean_plus_t_times_standard_error() -> None:
    mean, half = claims.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert claims.interval([7.0]) == (7.0, math.inf)
    with pytest.raises(ValueError):
        claims.interval([])


def test_plateau_averages_the_last_tenth_of_the_rounds() -> None:
    curve = [{"round": t, "grad_norm_sq": float(t)} for t in range(0, 101, 10)]
    assert claims.plateau(curve) == 95.0  # rounds 90 and 100
    diverged = [*curve[:-1], {"round": 100, "diverged": "x"}]
    assert math.isnan(claims.plateau(diverged))


def found_for(base_small: float, dm_small: float, base_large: float, dm_large: float) -> dict:
    half = 0.01
    return {
        ("alie", "byz-ef21-sgdm", 1): (base_small, half),
        ("alie", "byz-dm21", 1): (dm_small, half),
        ("alie", "byz-ef21-sgdm", 64): (base_large, half),
        ("alie", "byz-dm21", 64): (dm_large, half),
        ("alie", "byz-ef21", 1): (0.1, half),
        ("alie", "byz-ef21", 64): (0.1, half),
    }


def test_verdicts_read_the_intervals() -> None:
    holds = claims.verdicts(found_for(1.0, 0.5, 0.6, 0.5))
    assert "below byz-ef21-sgdm at b = 1 (intervals disjoint)" in holds[0]
    assert "ratio 2.00 at b = 1, 1.20 at b = 64: the advantage shrinks" in holds[0]
    assert "plateau varies 1.00× across b" in holds[1]
    above = claims.verdicts(found_for(0.5, 1.0, 0.5, 0.5))
    assert "ABOVE byz-ef21-sgdm" in above[0]
    overlap = claims.verdicts(found_for(1.0, 0.995, 1.0, 0.5))
    assert "not separable" in overlap[0] and "does not shrink" in overlap[0]


def test_geometric_phase_recovers_the_rate_of_a_geometric_decay() -> None:
    # gap = 10^(−t/200) + 1e-4: one decade per 200 rounds until it meets the 1e-4 plateau.
    curve = [{"round": t, "loss_gap": 10 ** (-t / 200) + 1e-4} for t in range(0, 3001, 25)]
    per_decade, r2, level = claims.geometric_phase(curve)
    assert per_decade == pytest.approx(200, rel=0.1) and r2 > 0.98
    assert level == pytest.approx(1e-4, rel=0.01)
    assert claims.geometric_phase([{"round": 0, "train_loss": 1.0}]) is None


@pytest.fixture(scope="module")
def batch_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real a9a runs: 2 methods × b ∈ {1, 4} × 2 seeds, with loss_gap recorded."""
    root = tmp_path_factory.mktemp("claims")
    grid = """
base = "base.toml"
[axes]
"algorithm.name" = ["byz-ef21-sgdm", "byz-dm21"]
"task.batch_size" = [1, 4]
"run.seed" = [0, 1]
"""
    out = root / "out"
    for cell in expand(load_grid(write_grid(root, grid, base_toml()))):
        assert run_cell(cell, out).status == "run"
    return out


def test_report_of_a_batch_sweep_has_both_claim_sections(batch_sweep: Path, tmp_path: Path):
    rows = write_report(batch_sweep, tmp_path, Objective("loss_gap"), "byzps report x")
    assert len(rows) == 4  # 2 methods × 2 batch sizes, seeds averaged
    text = (tmp_path / "report.md").read_text()
    assert "## Neighbourhood vs batch size" in text and "| b = 1 | b = 4 |" in text
    assert "| train_loss | loss_gap | test_accuracy |" in text  # the gap's own table column
    # 30 rounds never get within 2× of a plateau: no geometric phase to fit, no PL section.
    assert "## Linear convergence (PL)" not in text
    assert (tmp_path / "plateau_vs_batch.png").read_bytes().startswith(b"\x89PNG")
    found = claims.plateaus(rows)
    assert set(found) == {("alie", m, b) for m in ("byz-ef21-sgdm", "byz-dm21") for b in (1, 4)}
    row = rows[0]
    expected = np.mean([claims.plateau(run.curve) for run in row.runs])
    assert found[(row.attack, row.method, 1 if "1" in row.setting else 4)][0] == pytest.approx(
        expected
    )


def test_the_full_gradient_floor_is_drawn_as_a_level(tmp_path: Path) -> None:
    """Byz-EF21 draws no mini-batch: run at one b, it is a horizontal level in every panel."""
    found = found_for(1.0, 0.5, 0.6, 0.5)
    del found[("alie", "byz-ef21", 64)]
    claims.plot_plateaus(found, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    assert not any("byz-ef21 " in line for line in claims.verdicts(found))  # one b: no spread
