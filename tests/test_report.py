"""`byzps report`: means over seeds, the lr rule, the Markdown tables and the PNG plots."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner
from test_sweep import write_grid

from byzps.cli.main import main
from byzps.common.config import RunConfig
from byzps.sim.grid import expand, load_grid, run_cell
from byzps.sim.report import (
    LR,
    SEED,
    Objective,
    ReportError,
    Row,
    Selection,
    build_rows,
    load_runs,
    ordering,
    render,
    seed_band,
    table,
    versus,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid (2 methods × 2 seeds), run through the library API, no CLI."""
    root = tmp_path_factory.mktemp("report")
    out = root / "out"
    for cell in expand(load_grid(write_grid(root))):
        assert run_cell(cell, out).status == "run"
    return out


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """Markdown table rows keyed by method, each a column → cell mapping."""
    main = markdown.split("## Suspicion scores")[0]
    lines = [line for line in main.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells != head:
            rows[cells[0]] = dict(zip(head, cells, strict=True))
    return rows


def mean_std(text: str) -> tuple[float, float]:
    mean, std = text.split(" ± ")
    return float(mean), float(std)


def test_report_table_holds_the_mean_over_seeds_and_valid_pngs(swept: Path) -> None:
    report_dir = swept.parent / "report"
    stale = report_dir / "suspicion" / "an-earlier-report-row.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(PNG_MAGIC)
    args = [sys.executable, "-m", "byzps.cli.main", "report", str(swept), "--out", str(report_dir)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    text = (report_dir / "report.md").read_text()
    assert "lowest mean over seeds of the final train_loss" in text
    # Cells run through the library leave no grid.json: nothing claims a sweep made them.
    assert text.startswith("# Report of separate runs") and "byzps sweep " not in text
    assert f"byzps report {os.path.relpath(swept)} --out" in text  # relative paths
    assert "## attack: alie" in text

    finals: dict[str, list[dict[str, float]]] = {}
    for summary in swept.glob("*/summary.json"):
        data = json.loads(summary.read_text())
        finals.setdefault(data["config"]["algorithm"]["name"], []).append(data["final"])
    rows = table_rows(text)
    # Each method runs its own compressor, and neither is the usual one: both names say so.
    names = {"byz-dm21": "byz-dm21 [compressor.name=topk]",
             "br-csgd": "br-csgd [compressor.name=randk]"}  # fmt: skip
    assert set(rows) == set(names.values()) and set(finals) == set(names)
    for method, runs in finals.items():
        row = rows[names[method]]
        assert row["seeds"] == "2" and row["lr"].startswith("0.05")
        losses = [r["train_loss"] for r in runs]
        mean, half = mean_std(row["train_loss"])
        assert mean == pytest.approx(np.mean(losses), rel=1e-5)
        # The 95 % t interval's half-width over the 2 seeds: t_{0.975, 1} = 12.706.
        expected = 12.706 * np.std(losses, ddof=1) / math.sqrt(2)
        assert half == pytest.approx(expected, rel=0.05, abs=1e-12)
        accuracy, _ = mean_std(row["test_accuracy"])
        assert accuracy == pytest.approx(np.mean([r["test_accuracy"] for r in runs]), abs=6e-5)
        assert float(row["bytes uplink"]) == np.mean([r["bytes_uplink"] for r in runs])

    embedded = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    curves = ["train_loss_vs_bits.png", "train_loss_vs_rounds.png"]
    seed0 = sorted(f"suspicion/{p.parent.name}.png" for p in swept.glob("*seed0*/summary.json"))
    assert len(seed0) == 2  # one suspicion plot per report row: its lowest seed's run
    assert sorted(embedded) == sorted(curves + seed0)
    assert not stale.exists()  # the report owns its suspicion folder: no orphaned plots
    suspicion = text.split("## Suspicion scores")[1]
    for method in ("byz-dm21", "br-csgd"):
        assert f"| alie | {method} | nnm+cm |" in suspicion
    for name in embedded:
        png = report_dir / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# -- lr selection on a hand-built results directory ---------------------------------------------


def write_run(out: Path, lr: float, seed: int, losses: list[float], attack: str = "alie") -> None:
    """A cell directory as the simulator writes it, with the given train_loss trajectory."""
    config = RunConfig().to_dict()
    config["run"]["seed"], config["algorithm"]["lr"] = seed, lr
    config["attack"]["name"], config["cluster"]["byzantine"] = attack, 2
    records = [
        {"round": 10 * i, "train_loss": loss, "grad_norm_sq": loss / 10, "bytes_uplink": 80 * i}
        for i, loss in enumerate(losses)
    ]
    cell = out / f"{attack}_lr{lr}_seed{seed}"
    cell.mkdir(parents=True)
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"config": config, "config_digest": "x", "final": records[-1], "rounds": 30}
    (cell / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def hand_built(tmp_path: Path) -> Path:
    """lr 0.1 owns the single best final run (0.30) but the worse mean (0.40); lr 0.01 has the
    lower mean final (0.35) but never gets as low as lr 0.1 did mid-run; lr 1.0 diverged."""
    write_run(tmp_path, 0.1, 0, [0.7, 0.10, 0.2, 0.30])
    write_run(tmp_path, 0.1, 1, [0.7, 0.20, 0.3, 0.50])
    write_run(tmp_path, 0.01, 0, [0.7, 0.50, 0.4, 0.35])
    write_run(tmp_path, 0.01, 1, [0.7, 0.50, 0.4, 0.35])
    write_run(tmp_path, 1.0, 0, [0.7, 0.05, math.nan, math.nan])
    write_run(tmp_path, 1.0, 1, [0.7, 0.05, math.inf, math.inf])
    write_run(tmp_path, 0.1, 0, [0.7, 0.6, 0.5, 0.45], attack="na")
    write_run(tmp_path, 0.01, 0, [0.7, 0.6, 0.5, 0.55], attack="na")
    return tmp_path


def test_lr_with_the_lower_mean_final_loss_is_chosen(hand_built: Path) -> None:
    rows = build_rows(load_runs(hand_built), Objective("train_loss", "final"))
    chosen = {row.attack: row for row in rows}
    assert [row.attack for row in rows] == ["na", "alie"]
    assert chosen["alie"].lr == 0.01 and chosen["alie"].tried == [0.01, 0.1, 1.0]
    assert chosen["alie"].stat("train_loss") == pytest.approx((0.35, 0.0))
    assert chosen["na"].lr == 0.1
    markdown = table([chosen["alie"]])
    assert "| 0.35 ± 0 |" in markdown and "| 0.01 (of 0.01, 0.1, 1) | 2 |" in markdown
    assert "test_accuracy" not in markdown  # the hand-built runs record none


def test_select_by_best_uses_the_best_value_reached(hand_built: Path) -> None:
    rows = build_rows(load_runs(hand_built), Objective("train_loss", "best"))
    alie = next(row for row in rows if row.attack == "alie")
    # Best-so-far means: lr 0.1 → 0.15, lr 0.01 → 0.35; lr 1.0 reached 0.05 but then diverged.
    assert alie.lr == 0.1
    assert Objective("train_loss", "best").run_score(alie.runs[0]) == 0.10


def test_a_diverged_lr_is_never_chosen(tmp_path: Path) -> None:
    write_run(tmp_path, 1.0, 0, [0.7, math.nan])
    write_run(tmp_path, 0.1, 0, [0.7, 0.69])
    (row,) = build_rows(load_runs(tmp_path), Objective("train_loss", "final"))
    assert row.lr == 0.1


@pytest.mark.parametrize("select_by", ["final", "best"])
def test_a_run_the_simulator_stopped_as_diverged_scores_worst(select_by: str) -> None:
    from byzps.sim.report import Run

    final = {"round": 40, "train_loss": 0.3, "diverged": "round 40: honest worker 1 sent …"}
    run = Run("cell", {}, final, [{"round": 0, "train_loss": 0.7}, final])
    assert Objective("train_loss", select_by).run_score(run) == math.inf
    assert Objective("test_accuracy", select_by).run_score(run) == -math.inf


def test_a_single_run_is_reported_as_one(swept: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    shutil.copytree(next(swept.glob("*/summary.json")).parent, single / "run")
    args = [sys.executable, "-m", "byzps.cli.main", "report", str(single)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    text = (single / "report" / "report.md").read_text()
    assert text.startswith("# Run report") and "Of one run found under" in text


# -- choosing on seeds of its own, tuning more than lr, and what the intervals order -------------


def write_method_run(
    out: Path,
    method: str,
    lr: float,
    eta: float,
    seed: int,
    final_loss: float,
    compressor: str = "topk",
    batch: int = 1,
    aggregator: str = "",
) -> None:
    """A cell of `method` (lr, eta, seed, compressor, batch size; `aggregator` alone, without
    the default's pre-aggregator, when given) whose train_loss ends at `final_loss`."""
    config = RunConfig().to_dict()
    if aggregator:
        config["aggregator"]["name"], config["aggregator"]["pre"] = aggregator, []
    config["run"]["seed"], config["algorithm"]["lr"] = seed, lr
    config["algorithm"]["name"], config["algorithm"]["eta"] = method, eta
    config["compressor"]["name"], config["task"]["batch_size"] = compressor, batch
    config["attack"]["name"], config["cluster"]["byzantine"] = "alie", 2
    records = [
        {"round": 0, "train_loss": 0.7, "grad_norm_sq": 0.07, "bytes_uplink": 0},
        {"round": 10, "train_loss": final_loss, "grad_norm_sq": 0.01, "bytes_uplink": 80},
    ]
    cell = out / f"{method}_{compressor}_b{batch}{aggregator}_lr{lr}_eta{eta}_seed{seed}"
    cell.mkdir(parents=True)
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"config": config, "config_digest": "x", "final": records[-1], "rounds": 10}
    (cell / "summary.json").write_text(json.dumps(summary))


def test_selection_seeds_choose_and_the_other_seeds_are_reported(tmp_path: Path) -> None:
    """On seeds 0–1 lr 0.1 is better; on seeds 2–3 lr 0.01 would be. Chosen on 0–1, the row is
    lr 0.1 and reports seeds 2–3 only; chosen on every seed, the lower overall mean wins."""
    for seed, (good, bad) in enumerate([(0.30, 0.40), (0.30, 0.40), (0.60, 0.20), (0.60, 0.20)]):
        write_method_run(tmp_path, "byz-dm21", 0.1, 0.1, seed, good)
        write_method_run(tmp_path, "byz-dm21", 0.01, 0.1, seed, bad)
    runs = load_runs(tmp_path)
    (row,) = build_rows(runs, Objective(), Selection(seeds=frozenset({0, 1})))
    assert row.lr == 0.1 and [run.seed for run in row.runs] == [2, 3]
    assert row.stat("train_loss") == pytest.approx((0.60, 0.0))
    (biased,) = build_rows(runs, Objective())
    assert biased.lr == 0.01 and len(biased.runs) == 4
    with pytest.raises(ReportError, match=r"selection seeds: .* has no other seed"):
        build_rows(runs, Objective(), Selection(seeds=frozenset({0, 1, 2, 3})))
    with pytest.raises(ReportError, match="selection seeds: no run of"):
        build_rows(runs, Objective(), Selection(seeds=frozenset({9})))


def test_the_selection_line_says_nothing_was_chosen_when_each_row_tried_one_setting(
    tmp_path: Path,
) -> None:
    """One lr per row on three seeds: no seed's numbers can be favoured, and the report must not
    call them biased; a second lr makes it a choice again."""
    for seed in range(3):
        write_method_run(tmp_path, "byz-dm21", 0.1, 0.1, seed, 0.3 + 0.01 * seed)
    text = render(build_rows(load_runs(tmp_path), Objective()), Objective(), [], {})
    assert "every row tried one setting of algorithm.lr, so nothing is chosen" in text
    assert "biased" not in text
    write_method_run(tmp_path, "byz-dm21", 0.01, 0.1, 0, 0.5)
    text = render(build_rows(load_runs(tmp_path), Objective()), Objective(), [], {})
    assert "biased in its favour" in text
    # A two-stage study before its second stage: every row pending, none to count settings on;
    # its settings were still chosen, on the selection seeds.
    pending: list[str] = []
    selection = Selection(seeds=frozenset({0, 1, 2}))
    rows = build_rows(load_runs(tmp_path), Objective(), selection, pending)
    assert rows == [] and pending
    text = render(rows, Objective(), [], {}, selection=selection, pending=pending)
    assert "chosen on seeds 0, 1, 2 only" in text and "nothing is chosen" not in text


def test_eta_is_tuned_with_lr_and_leaves_the_setting_column(tmp_path: Path) -> None:
    for seed in range(3):
        for lr, eta, loss in [
            (0.1, 0.1, 0.5),
            (0.1, 0.01, 0.3),
            (0.01, 0.1, 0.4),
            (0.01, 0.01, 0.6),
        ]:
            write_method_run(tmp_path, "byz-dm21", lr, eta, seed, loss + 0.001 * seed)
    runs = load_runs(tmp_path)
    (row,) = build_rows(runs, Objective(), Selection((LR, "algorithm.eta")))
    assert row.tuned == {LR: 0.1, "algorithm.eta": 0.01} and row.settings_tried == 4
    assert row.setting == ""  # eta is tuned, not a setting of its own
    markdown = table([row])
    assert "| chosen |" in markdown and "| lr 0.1, eta 0.01 (of 4) | 3 |" in markdown
    untuned = build_rows(runs, Objective())  # eta not tuned: one row per eta
    assert sorted(r.setting for r in untuned) == ["algorithm.eta=0.01", "algorithm.eta=0.1"]
    with pytest.raises(ReportError, match=r"tune: run\.seed"):
        Selection((LR, SEED))


def three_methods(folder: Path) -> list[Row]:
    """Rows of three methods: dm21 and ef21-sgdm far apart with tight intervals (dm21 lower),
    ef21 overlapping ef21-sgdm."""
    finals = {"byz-dm21": [0.30, 0.301, 0.299], "byz-ef21-sgdm": [0.40, 0.41, 0.39],
              "byz-ef21": [0.42, 0.38, 0.45]}  # fmt: skip
    for method, losses in finals.items():
        for seed, loss in enumerate(losses):
            write_method_run(folder, method, 0.1, 0.1, seed, loss)
    return build_rows(load_runs(folder), Objective())


def test_the_ordering_says_less_only_where_the_intervals_are_disjoint(tmp_path: Path) -> None:
    """a < b (disjoint), b ≈ c (overlapping): `three_methods`."""
    rows = three_methods(tmp_path)
    (line,) = ordering(rows, Objective())
    names = re.findall(r"([a-z0-9-]+) \(", line)
    assert names == ["byz-dm21", "byz-ef21-sgdm", "byz-ef21"]
    assert re.findall(r"\) ([<≈]) ", line) == ["<", "≈"]
    reversed_line = ordering(rows, Objective("grad_norm_sq"))  # all equal: one tie chain
    assert reversed_line[0].count("≈") == 2 and "<" not in reversed_line[0]
    for row in rows:  # the plots' band at the last round is the table's interval
        _, _, mean, half = seed_band(row, "train_loss")
        assert (mean[-1], half[-1]) == pytest.approx(row.stat("train_loss"))


def test_a_setting_that_goes_with_its_method_names_the_method_and_splits_no_ordering(
    tmp_path: Path,
) -> None:
    """A Rand-k baseline beside Top-k methods: its compressor is part of what the method is, so
    all three are ordered together and the baseline's name carries it. A batch-size axis that
    every method runs at two values is a setting: it splits the ordering, one line per value."""
    finals = {("byz-dm21", "topk"): 0.30, ("byz-ef21-sgdm", "topk"): 0.40,
              ("byz-vr-marina", "randk"): 0.50}  # fmt: skip
    for (method, compressor), loss in finals.items():
        for batch in (1, 4):
            for seed in range(3):
                loss_here = loss + 0.001 * seed + batch / 100
                write_method_run(tmp_path, method, 0.1, 0.1, seed, loss_here, compressor, batch)
    rows = build_rows(load_runs(tmp_path), Objective())
    assert {row.setting for row in rows} == {"task.batch_size=1", "task.batch_size=4"}
    marina = [row for row in rows if row.method == "byz-vr-marina"]
    assert {row.name for row in marina} == {"byz-vr-marina [compressor.name=randk]"}
    assert all(row.variant == "" for row in rows if row.method != "byz-vr-marina")
    lines = ordering(rows, Objective())
    assert len(lines) == 2  # one per batch size, each holding all three methods
    for line in lines:
        assert re.findall(r"([a-z0-9-]+(?: \[[^]]*\])?) \(", line) == [
            "byz-dm21",
            "byz-ef21-sgdm",
            "byz-vr-marina [compressor.name=randk]",
        ]
    assert "| byz-vr-marina [compressor.name=randk] | cm |" in table(rows)


def test_versus_names_the_better_method_only_where_the_intervals_are_disjoint(
    tmp_path: Path,
) -> None:
    """`three_methods`: dm21 < ef21-sgdm (disjoint), ef21-sgdm ≈ ef21."""
    rows = three_methods(tmp_path)

    def verdict(a: str, b: str) -> tuple[str, str]:
        lines = versus(rows, Objective(), (a, b))
        return lines[4].split("|")[2].strip(), lines[-1]

    assert verdict("byz-dm21", "byz-ef21-sgdm") == (
        "byz-dm21",
        "byz-dm21 better in 1, byz-ef21-sgdm better in 0, cannot tell in 0 of 1 cells.",
    )
    assert verdict("byz-ef21-sgdm", "byz-dm21")[0] == "byz-dm21"
    assert verdict("byz-ef21-sgdm", "byz-ef21")[0] == "≈"


def test_a_setting_names_only_the_keys_a_row_sets(tmp_path: Path) -> None:
    """Top-k with k beside QSGD without one: the QSGD row's setting leaves k (null) and the
    Top-k row's leaves params ({}) out, and the two still differ."""
    write_method_run(tmp_path, "byz-dm21", 0.1, 0.1, 0, 0.3)  # topk
    write_method_run(tmp_path, "byz-dm21", 0.1, 0.1, 0, 0.31, compressor="qsgd")
    for summary in tmp_path.glob("*qsgd*/summary.json"):
        data = json.loads(summary.read_text())
        data["config"]["compressor"].update(k=None, params={"levels": 1})
        summary.write_text(json.dumps(data))
    for summary in tmp_path.glob("*topk*/summary.json"):
        data = json.loads(summary.read_text())
        data["config"]["compressor"].update(k=1, params={})
        summary.write_text(json.dumps(data))
    settings = sorted(row.setting for row in build_rows(load_runs(tmp_path), Objective()))
    assert settings == [
        'compressor.name=qsgd, compressor.params={"levels": 1}',
        "compressor.name=topk, compressor.k=1",
    ]


def test_versus_compares_two_aggregators_in_every_method_cell(tmp_path: Path) -> None:
    """Aggregators as the pair: cm better than krum for dm21 (disjoint), ≈ for ef21-sgdm."""
    finals = {("byz-dm21", "cm"): [0.30, 0.301, 0.299], ("byz-dm21", "krum"): [0.40, 0.41, 0.39],
              ("byz-ef21-sgdm", "cm"): [0.40, 0.42, 0.38],
              ("byz-ef21-sgdm", "krum"): [0.41, 0.37, 0.44]}  # fmt: skip
    for (method, rule), losses in finals.items():
        for seed, loss in enumerate(losses):
            write_method_run(tmp_path, method, 0.1, 0.1, seed, loss, aggregator=rule)
    rows = build_rows(load_runs(tmp_path), Objective())
    lines = versus(rows, Objective(), ("cm", "krum"))
    assert lines[0].startswith("**cm against krum**") and "the better aggregator" in lines[0]
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[4:6]}
    assert cells == {"byz-dm21": "cm", "byz-ef21-sgdm": "≈"}
    assert lines[-1] == "cm better in 1, krum better in 0, cannot tell in 1 of 2 cells."


def test_versus_takes_a_composed_aggregator_as_the_docs_write_it(tmp_path: Path) -> None:
    """`--versus nnm∘cm:krum` is `nnm+cm:krum`, the name the rows carry."""
    for seed in range(2):
        write_method_run(tmp_path, "byz-dm21", 0.1, 0.1, seed, 0.3 + 0.001 * seed)
        write_method_run(tmp_path, "byz-dm21", 0.1, 0.1, seed, 0.4, aggregator="krum")
    for summary in tmp_path.glob("*_b1_lr*/summary.json"):  # the default cm, behind nnm
        data = json.loads(summary.read_text())
        data["config"]["aggregator"]["pre"] = ["nnm"]
        summary.write_text(json.dumps(data))
    result = CliRunner().invoke(
        main, ["report", str(tmp_path), "--out", str(tmp_path / "r"), "--versus", "nnm∘cm:krum"]
    )
    assert result.exit_code == 0, result.output
    assert "**nnm+cm against krum**" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    ("pair", "message"),
    [("byz-dm21", "expected two methods or two aggregators as A:B"),
     ("byz-dm21:byz-dm21", "expected two methods"),
     ("byz-dm21:nope", "no row of method or aggregator 'nope'"),
     ("byz-dm21:cm", "pairs a method with an aggregator")],
)  # fmt: skip
def test_versus_refuses_a_bad_pair(hand_built: Path, pair: str, message: str) -> None:
    result = CliRunner().invoke(main, ["report", str(hand_built), "--versus", pair])
    assert result.exit_code != 0 and message in result.output, result.output
