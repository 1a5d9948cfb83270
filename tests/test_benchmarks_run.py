"""The server-side benchmarks run end to end on a tiny workload and print their tables.

Why: a benchmark nobody runs rots silently — `bench_round.py` and `bench_durability.py` still
called `.SerializeToString()` on `encode_row`'s result after it became wire bytes, and only the
next measurement found out. These runs take seconds; the numbers they print are not checked
(performance lives in the benchmarks, not in timed tests), only that every table row appears.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_support import load_benchmark


def test_bench_round_runs_both_paths_and_prints_their_parts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set, so that the script does not re-exec itself (timing.as_the_daemons_run) — over pytest.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    bench = load_benchmark("bench_round")
    bench.main(
        ["--sizes", "20000", "--rounds", "1", "--warmup", "2", "--workers", "5", "--f", "1",
         "--aggregators", "mean", "cm"]
    )  # fmt: skip
    out = capsys.readouterr().out
    for rule in ("mean", "cm"):
        rows = [line.split() for line in out.splitlines() if line.split()[:1] == [rule]]
        assert [row[1] for row in rows] == ["dense", "sparse"], out


def test_bench_durability_runs_every_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark("bench_durability")
    bench.main(
        ["--dim", "20000", "--workers", "4", "--rounds", "4", "--checkpoint-every", "2",
         "--eval-every", "2", "--dir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    for policy in ("none", "round", "group", "no storage"):
        assert policy in out, out


def test_bench_permk_prints_a_row_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_permk")
    bench.main(["--dims", "5000", "20000", "--workers", "4", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split()[1] for row in rows[1:]] == ["5e+03", "2e+04"], rows


def test_bench_running_sum_prints_a_row_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_running_sum")
    bench.main(["--dims", "5000", "20000", "--workers", "4", "--repeats", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split()[1] for row in rows[1:]] == ["5e+03", "2e+04"], rows


@pytest.mark.slow  # two launches
def test_bench_shards_prints_a_row_per_shard_count_with_the_same_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark("bench_shards")
    bench.main(
        ["--dim", "20000", "--workers", "4", "--f", "1", "--shards", "1", "2", "--rounds", "3",
         "3", "--aggregators", "cm", "--out", str(tmp_path)]
    )  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = [row for row in rows if row[:1] == ["cm"]]
    assert [row[1] for row in rows] == ["1", "2"]
    assert all(row[-3:] == ["bit", "for", "bit"] for row in rows), rows


def test_bench_column_share_prints_a_row_per_rule(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_column_share")
    bench.main(["--dims", "3000", "--workers", "7", "--shares", "0.1", "0.6", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3e+03")]
    assert [row.split("|")[2].strip() for row in rows] == ["cm", "meamed", "mean"], rows


def test_bench_simulator_ab_times_two_trees_in_turn(capsys: pytest.CaptureFixture[str]) -> None:
    """This tree against itself: both sides start, import the tree they were given (the script
    stops otherwise), take turns, and every summary row appears."""
    bench = load_benchmark("bench_simulator_ab")
    tree = Path(bench.__file__).resolve().parents[1]
    bench.main(["--old", str(tree), "--blocks", "2", "--rounds", "2", "--runs", "2"])
    out = capsys.readouterr().out
    for start in ("old ", "new ", "old / new, one run:", "old / new, batched:"):
        assert any(line.startswith(start) for line in out.splitlines()), out


def test_bench_batch_slope_prints_every_phase_and_the_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_benchmark("bench_batch_slope")
    bench.main(["--runs", "1", "2", "--rounds", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows[1:] == [*bench.PHASES, "other", "round"], out
    assert "needs c ≤" in out, out


def test_bench_state_layout_prints_a_row_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    """The prototype's band means are checked against the server's kernel inside the script."""
    bench = load_benchmark("bench_state_layout")
    bench.main(["--dims", "3000", "20000", "--workers", "7", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1].strip() for line in lines if line.startswith("| ")]
    assert rows[1:] == ["3e+03", "2e+04"], lines
