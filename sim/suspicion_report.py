"""The suspicion section of a report: how well each run's scores tell its Byzantine workers apart.

A run's final record carries every worker's suspicion score (server/suspicion.py). Under an attack
the Byzantine ids are the last f, so the scores can be judged as a detector: the ROC AUC is the
probability that a Byzantine worker scores higher than an honest one (ties count one half) —
1 separates them perfectly, 0.5 is chance, below 0.5 means the rule discounts the honest workers
more. Per report row (method × aggregator × attack, at its chosen lr) the table gives the AUC's
mean ± the half-width of its 95 % t interval over seeds (the interval every other table of a
report uses, so a comparison of two AUCs is read the same way) and the mean scores of each side;
a plot per run draws every worker's score over the rounds.

Why report it rather than act on it: an attack designed to sit inside the honest spread (ALIE)
is not discounted by the rule, so a low AUC there is the rule's behaviour, measured — not a defect
of the score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from byzps.sim.claims_report import interval
from byzps.sim.figures import save_png

#: Per-run plots are drawn for at most this many report rows (one run each, the lowest seed;
#: evenly spaced over the rows when there are more), so a large sweep's report stays small.
MAX_PLOTS = 12


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a positive > score of a negative) + ½ P(equal): the Mann–Whitney AUC."""
    values = np.asarray(scores, np.float64)
    mask = np.asarray(positive, bool)
    pos, neg = values[mask], values[~mask]
    if not pos.size or not neg.size:
        raise ValueError("the AUC needs at least one positive and one negative")
    greater = (pos[:, None] > neg[None, :]).sum()
    equal = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * equal) / (pos.size * neg.size))


def byzantine_ids(config: dict[str, Any]) -> list[int]:
    """The Byzantine worker ids of a run (flattened config): the last f under an attack."""
    n, f = int(config["cluster.workers"]), int(config["cluster.byzantine"])
    return [] if config["attack.name"] == "na" else list(range(n - f, n))


def detection(run: Any) -> tuple[float, float, float] | None:
    """(AUC, mean honest score, mean Byzantine score) of a run's final scores; None when the run
    kept no scores or has no Byzantine worker."""
    scores = run.final.get("suspicion")
    byzantine = byzantine_ids(run.config)
    if not scores or not byzantine or len(byzantine) >= len(scores):
        return None
    values = np.asarray(scores, np.float64)
    mask = np.isin(np.arange(values.size), byzantine)
    return roc_auc(values, mask), float(values[~mask].mean()), float(values[mask].mean())


def table(rows: Sequence[Any]) -> str | None:
    """Markdown: one line per row with scores, or None when no row has any."""
    lines = [
        "| attack | method | aggregator | AUC | honest score | Byzantine score | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        found = [d for d in (detection(run) for run in row.runs) if d is not None]
        if not found:
            continue
        auc, honest, byzantine = np.array(found).T
        lines.append(
            f"| {row.attack} | {row.method} | {row.aggregator} | {auc_text(auc)} | "
            f"{honest.mean():.3f} | {byzantine.mean():.3f} | {len(found)} |"
        )
    return "\n".join(lines) if len(lines) > 2 else None


def auc_text(aucs: Sequence[float]) -> str:
    """The AUCs' mean ± the half-width of its 95 % t interval (one seed: its value alone). The
    interval is not clipped to [0, 1]: it says how far the seeds let the mean move."""
    mean, half = interval(aucs)
    return f"{mean:.3f} ± {half:.2g}" if math.isfinite(half) else f"{mean:.3f}"


def plot_run(run: Any, path: Path) -> bool:
    """Every worker's score over the evaluation rounds (Byzantine ids dashed); False when the run
    has no scores to draw."""
    curve = [r for r in run.curve if r.get("suspicion")]
    if not curve:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = [r["round"] for r in curve]
    scores = np.array([r["suspicion"] for r in curve], np.float64)
    byzantine = set(byzantine_ids(run.config))
    figure = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    labelled: set[str] = set()
    for row in range(scores.shape[1]):
        kind = "Byzantine" if row in byzantine else "honest"
        ax.plot(
            rounds, scores[:, row], color="tab:red" if kind == "Byzantine" else "tab:blue",
            linestyle="--" if kind == "Byzantine" else "-", linewidth=0.9, alpha=0.8,
            label=None if kind in labelled else kind,
        )  # fmt: skip
        labelled.add(kind)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("round")
    ax.set_ylabel("suspicion score")
    ax.set_title(run.name, fontsize="small")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_png(figure, path, dpi=80)
    return True


def section(rows: Sequence[Any], out: Path) -> list[str]:
    """report.md's suspicion section (empty when no run kept scores); writes the per-run plots
    into out/suspicion/."""
    text = table(rows)
    if text is None:
        return []
    lines = [
        "",
        "## Suspicion scores",
        "",
        "Final per-worker suspicion scores (how strongly the rule discounted each worker; "
        "docs/algorithms.md) as a detector of the Byzantine ids: ROC AUC, the mean ± the "
        "half-width of its 95 % t interval over seeds (1: every Byzantine worker scores above "
        "every honest one; 0.5: chance), and the mean score of each side.",
        "",
        text,
    ]
    scored = [row for row in rows if any(detection(run) for run in row.runs)]
    step = max(1, math.ceil(len(scored) / MAX_PLOTS))
    runs = [row.runs[0] for row in scored[::step]]
    folder = out / "suspicion"
    # The folder is the report's own: plots of an earlier report whose rows changed would
    # otherwise linger beside the new ones, referenced by nothing.
    for stale in folder.glob("*.png"):
        stale.unlink()
    drawn = []
    for run in runs:
        folder.mkdir(parents=True, exist_ok=True)
        if plot_run(run, folder / f"{run.name}.png"):
            drawn.append(run.name)
    if drawn:
        lines += ["", "Per worker, over the rounds (Byzantine ids dashed; one run per row"
                  f"{'' if step == 1 else f', one row in {step}'}):", ""]  # fmt: skip
        lines += [f"![suspicion: {name}](suspicion/{name}.png)" for name in drawn]
    return lines
