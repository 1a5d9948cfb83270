"""Turn a sweep directory into a report: per-attack tables (mean ± 95 % interval over seeds, at
the hyperparameters chosen per method by a stated rule), which rows the intervals separate, and
loss/accuracy curves against rounds and bits sent.

Why the selection rule is explicit and printed: "best lr per method" silently changes a
comparison's outcome (final vs best-so-far, one seed vs the mean), so the report says exactly
which it used. Why it can choose on seeds of its own (`Selection.seeds`): a setting chosen on the
very seeds it is reported on is the luckiest of several draws, so its numbers are biased in its
favour; chosen on other seeds, the reported ones are an honest sample. Why runs are grouped by
every config key except seed and the tuned keys: any other difference (compressor, k, attack) is
a different experiment and must not be averaged together.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from byzps.sim import claims_report as claims
from byzps.sim import suspicion_report as suspicion
from byzps.sim.figures import save_png

SEED, LR, ATTACK = "run.seed", "algorithm.lr", "attack.name"
METHOD, AGGREGATOR, PRE = "algorithm.name", "aggregator.name", "aggregator.pre"
#: Keys with a column of their own (or none), so they never appear in the "setting" column.
_SHOWN = frozenset({SEED, LR, ATTACK, METHOD, AGGREGATOR, PRE})
METRICS = ("train_loss", "test_accuracy", "loss_gap", "grad_norm_sq")
#: Metrics where lower is better; they are also drawn on a log scale.
LOWER_IS_BETTER = frozenset({"train_loss", "loss_gap", "grad_norm_sq"})
SELECT_BY = ("final", "best")
#: Characters per line of a plot panel's title (a 5-inch panel holds ~60 at the title's size).
TITLE_WIDTH = 60


class ReportError(ValueError):
    """The sweep directory cannot be reported (no finished runs, a metric it lacks)."""


@dataclass(frozen=True)
class Run:
    """One finished cell: its resolved config (flattened to dotted keys) and its metrics."""

    name: str
    config: dict[str, Any]
    final: dict[str, Any]
    curve: list[dict[str, Any]]

    @property
    def seed(self) -> int:
        return int(self.config[SEED])

    @property
    def lr(self) -> float:
        return float(self.config[LR])


@dataclass(frozen=True)
class Objective:
    """What "best lr" means: a metric (lower loss or higher accuracy is better), read at the end
    of the run or as the best value reached, averaged over seeds."""

    metric: str = "train_loss"
    select_by: str = "final"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ReportError(f"metric: expected one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.select_by not in SELECT_BY:
            raise ReportError(f"select-by: expected final or best, got {self.select_by!r}")

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def run_score(self, run: Run) -> float:
        """The run's value under this objective. A diverged run (non-finite final value) scores
        worst under either rule: a good value before blowing up does not make an lr usable.
        So does a run the simulator stopped as diverged (`diverged` in its final record)."""
        if run.final.get("diverged"):
            return self.worst
        value = float(run.final[self.metric])
        if self.select_by == "best" and math.isfinite(value):
            values = [float(r[self.metric]) for r in run.curve]
            finite = [v for v in values if math.isfinite(v)]
            pick = min if self.lower_is_better else max
            value = pick(finite) if finite else math.nan
        return value if math.isfinite(value) else self.worst

    def separates(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Whether interval a (mean, half-width) lies entirely on the better side of b."""
        return claims.disjoint_below(a, b) if self.lower_is_better else claims.disjoint_below(b, a)

    @property
    def worst(self) -> float:
        return math.inf if self.lower_is_better else -math.inf

    def rule(self) -> str:
        which = "final" if self.select_by == "final" else "best-over-the-run"
        direction = "lowest" if self.lower_is_better else "highest"
        return (
            f"for each method × aggregator × attack, the setting with the {direction} mean over "
            f"seeds of the {which} {self.metric} (a run that diverged or whose final value is not "
            "finite counts as worst; ties go to the smaller setting)"
        )


@dataclass(frozen=True)
class Selection:
    """Which config keys are tuned per row, and on which seeds the choice is made.

    With no selection seeds every run is used both to choose and to report (the choice is then
    biased towards the reported numbers, and the report says so); with some, the setting is chosen
    on those seeds' runs only and the table reports the other seeds' runs.
    """

    keys: tuple[str, ...] = (LR,)
    seeds: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if LR not in self.keys:
            raise ReportError(f"tune: {LR} is always tuned, got {', '.join(self.keys)}")
        if SEED in self.keys:
            raise ReportError(f"tune: {SEED} is what settings are averaged over, not tuned")

    def describe(self, chosen: bool = True) -> str:
        """The selection as the report states it; `chosen` False when no row tried more than one
        setting, so that nothing was chosen and no seed's numbers can be favoured."""
        keys = ", ".join(self.keys)
        if not chosen:
            return f"every row tried one setting of {keys}, so nothing is chosen"
        if not self.seeds:
            return (
                f"{keys} chosen on the same seeds the table reports (so the chosen setting's "
                "numbers are biased in its favour)"
            )
        seeds = ", ".join(str(s) for s in sorted(self.seeds))
        return f"{keys} chosen on seeds {seeds} only; the table reports the other seeds"


@dataclass
class Row:
    """One method × aggregator (× other setting) under one attack, at its chosen setting."""

    attack: str
    method: str
    aggregator: str
    setting: str
    #: The chosen value of every tuned key (lr among them), every lr tried, and how many
    #: settings (combinations of the tuned keys) were tried.
    tuned: dict[str, Any]
    tried: list[float]
    settings_tried: int
    runs: list[Run] = field(default_factory=list)
    #: Settings that go with the method wherever it runs and differ from the other methods' (the
    #: Rand-k of an unbiased-compressor baseline), shown beside its name rather than as a setting
    #: that would split the ordering.
    variant: str = ""
    #: `setting` without the keys the attack fixes: what separates the plots' rows of panels.
    panel: str = ""

    @property
    def name(self) -> str:
        """The method with its variant, e.g. "byz-vr-marina [compressor.name=randk]"."""
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def lr(self) -> float:
        return float(self.tuned[LR])

    def stat(self, key: str) -> tuple[float, float]:
        """Mean and half-width of the 95 % t interval of a final metric over seeds (half-width
        inf for one seed)."""
        return claims.interval([float(run.final[key]) for run in self.runs])

    @property
    def label(self) -> str:
        parts = [self.name, self.aggregator] + ([self.setting] if self.setting else [])
        return " × ".join(parts)


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every finished cell (one with summary.json) under the sweep directory, by name."""
    runs = [load_run(path.parent) for path in sorted(sweep_dir.glob("*/summary.json"))]
    if not runs:
        raise ReportError(f"{sweep_dir}: no finished runs (no */summary.json)")
    return runs


def load_run(cell_dir: Path) -> Run:
    """One finished cell: its summary.json and its metrics.jsonl curve."""
    summary = json.loads((cell_dir / "summary.json").read_text())
    lines = (cell_dir / "metrics.jsonl").read_text().splitlines()
    curve = [json.loads(line) for line in lines if line.strip()]
    return Run(cell_dir.name, flatten(summary["config"]), summary["final"], curve)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections to dotted keys; table-valued settings (params) stay whole."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and not prefix:
            flat.update(flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value differs between runs, in config order."""
    keys = list(runs[0].config)
    return [k for k in keys if len({_canonical(r.config.get(k)) for r in runs}) > 1]


def _held(runs: Sequence[Run], keys: Sequence[str], owner: str) -> dict[str, dict[str, set[str]]]:
    """key → value of `owner` → the values of key in the runs with that owner value."""
    held: dict[str, dict[str, set[str]]] = {key: {} for key in keys}
    for run in runs:
        for key in keys:
            held[key].setdefault(str(run.config[owner]), set()).add(_show(run.config.get(key)))
    return held


def bound_keys(runs: Sequence[Run], keys: Sequence[str], owner: str) -> list[str]:
    """The `keys` whose value the `owner` key fixes in every run (na's 12 workers by the attack)."""
    return _fixed(_held(runs, keys, owner))


def _fixed(held: dict[str, dict[str, set[str]]]) -> list[str]:
    """The keys of a `_held` map that hold one value per owner value."""
    return [k for k, by_owner in held.items() if all(len(v) == 1 for v in by_owner.values())]


def method_bound(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, str | None]:
    """The `keys` that each method holds at one value in every run (a baseline's own compressor,
    Byz-EF21's stochastic flag): part of what the method is, not a setting of the experiment.
    Each maps to its usual value, the one most methods hold, so that only the methods that
    differ from it need saying so; where no value is held by most (a tie), to None: every
    method then says its own."""
    held = _held(runs, keys, METHOD)
    usual = {}
    for key in _fixed(held):
        values = [next(iter(v)) for v in held[key].values()]
        counts = sorted((values.count(v) for v in set(values)), reverse=True)
        usual[key] = max(values, key=values.count) if counts[0] > counts[1] else None
    return usual


def group_key(config: dict[str, Any], tuned: Sequence[str]) -> str:
    """What makes a row: every config key but the seed and the tuned keys (canonical JSON)."""
    return _canonical({k: v for k, v in config.items() if k != SEED and k not in tuned})


def select_setting(candidates: dict[tuple, list[Run]], objective: Objective) -> tuple:
    """The setting whose mean score over its runs is best under `objective` (ties: the smaller
    setting, compared key by key)."""

    def badness(setting: tuple) -> tuple[float, tuple]:
        mean = float(np.mean([objective.run_score(run) for run in candidates[setting]]))
        return (mean if objective.lower_is_better else -mean), setting

    return min(candidates, key=badness)


def build_rows(
    runs: Sequence[Run],
    objective: Objective,
    selection: Selection = Selection(),
    pending: list[str] | None = None,
) -> list[Row]:
    """Group runs by every key except seed and the tuned keys, choose each group's setting on
    the selection seeds, report the rest; order the rows. A group whose chosen setting has no run
    on a reported seed is an error, or, given a `pending` list, described there and left out (a
    two-stage study whose second stage has not finished)."""
    tuned = selection.keys
    extra = [k for k in varying_keys(runs) if k not in _SHOWN and k not in tuned]
    bound = method_bound(runs, extra)
    extra = [k for k in extra if k not in bound]
    # Keys the attack fixes (na's 12 workers) go in the table, but do not make panels of their own.
    panel_keys = [k for k in extra if k not in bound_keys(runs, extra, ATTACK)]
    groups: dict[str, dict[tuple, list[Run]]] = {}
    for run in runs:
        key = group_key(run.config, tuned)
        setting = tuple(run.config.get(k) for k in tuned)
        groups.setdefault(key, {}).setdefault(setting, []).append(run)
    rows = []
    for by_setting in groups.values():
        choosing = by_setting
        if selection.seeds:
            choosing = {
                setting: chosen
                for setting, group in by_setting.items()
                if (chosen := [r for r in group if r.seed in selection.seeds])
            }
            if not choosing:
                raise ReportError(f"selection seeds: no run of {_describe(by_setting)} has one")
        setting = select_setting(choosing, objective)
        reported = [r for r in by_setting[setting] if r.seed not in selection.seeds]
        if not reported and pending is not None:
            chosen_text = _setting_text(dict(zip(tuned, setting, strict=True)))
            aggregator = _aggregator_of(by_setting[setting][0].config)
            pending.append(f"{_describe(by_setting)} with {aggregator} ({chosen_text})")
            continue
        if not reported:
            raise ReportError(f"selection seeds: {_describe(by_setting)} has no other seed")
        chosen = sorted(reported, key=lambda run: run.seed)
        config = chosen[0].config
        rows.append(
            Row(
                attack=str(config[ATTACK]),
                method=str(config[METHOD]),
                aggregator=_aggregator_of(config),
                setting=_assignments(config, extra),
                panel=_assignments(config, panel_keys),
                variant=", ".join(
                    f"{k}={_show(config[k])}" for k, v in bound.items() if _show(config[k]) != v
                ),
                tuned=dict(zip(tuned, setting, strict=True)),
                tried=sorted({float(s[tuned.index(LR)]) for s in by_setting}),
                settings_tried=len(by_setting),
                runs=chosen,
            )
        )
    rows.sort(key=lambda r: (r.attack != "na", r.attack, r.method, r.aggregator, r.setting))
    return rows


def _describe(by_setting: dict[tuple, list[Run]]) -> str:
    run = next(iter(by_setting.values()))[0]
    return f"{run.config[METHOD]} under {run.config[ATTACK]}"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else _canonical(value)


def _assignments(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A row's setting as "key=value, …" over `keys`, leaving out the keys it leaves unset (None,
    or an empty table or list): a QSGD row reads "compressor.name=qsgd, compressor.params=…",
    not "…, compressor.k=null, …" because the Top-k rows beside it set k."""
    return ", ".join(f"{k}={_show(config[k])}" for k in keys if config[k] not in (None, {}, []))


def _show_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else _show(value)


def _setting_text(values: dict[str, Any]) -> str:
    """Tuned keys' values by their short names, e.g. "lr 0.1, eta 0.01"."""
    return ", ".join(f"{key.split('.')[-1]} {_show_value(v)}" for key, v in values.items())


def _tuned_text(row: Row) -> str:
    """The row's chosen setting, e.g. "lr 0.1, eta 0.01"."""
    return _setting_text(row.tuned)


def _aggregator_of(config: dict[str, Any]) -> str:
    """The rule with its wrappers, outermost first, e.g. "nnm+cm"."""
    return "+".join([*config.get(PRE, []), str(config[AGGREGATOR])])


def _where(aggregator: str, setting: str) -> str:
    """A group's label: the aggregator, and the setting when there is one."""
    return aggregator + (f", {setting}" if setting else "")


def attacks(rows: Sequence[Row]) -> list[str]:
    """Attack names in row order (no attack first)."""
    return list(dict.fromkeys(row.attack for row in rows))


def seed_band(row: Row, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """rounds, bits sent (uplink bytes × 8), and the mean of `metric` over seeds with the
    half-width of its 95 % t interval (zeros for one seed: no band), on the evaluation rounds
    every seed recorded — the tables' statistic, round by round."""
    per_seed = [{r["round"]: r for r in run.curve} for run in row.runs]
    rounds = sorted(set.intersection(*(set(records) for records in per_seed)))
    values = np.array([[s[t][metric] for t in rounds] for s in per_seed], dtype=np.float64)
    bits = np.array([[s[t]["bytes_uplink"] * 8 for t in rounds] for s in per_seed], np.float64)
    half = np.zeros(len(rounds))
    if len(per_seed) > 1:
        half = np.array([claims.interval(column)[1] for column in values.T])
    return np.array(rounds), bits.mean(axis=0), values.mean(axis=0), half


def _pm(mean: float, half: float, spec: str) -> str:
    return f"{mean:{spec}} ± {half:.2g}" if math.isfinite(half) else f"{mean:{spec}}"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table of final metrics, one row per method × aggregator at its chosen lr."""
    accuracy = all("test_accuracy" in run.final for row in rows for run in row.runs)
    gap = all("loss_gap" in run.final for row in rows for run in row.runs)
    setting = any(row.setting for row in rows)
    head = ["method", "aggregator"] + (["setting"] if setting else []) + ["train_loss"]
    head += (["loss_gap"] if gap else []) + (["test_accuracy"] if accuracy else [])
    head += ["grad_norm_sq", "bytes uplink"]
    head += ["lr" if all(set(row.tuned) <= {LR} for row in rows) else "chosen"]
    head += ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.name, row.aggregator] + ([row.setting] if setting else [])
        cells.append(_pm(*row.stat("train_loss"), ".6g"))
        if gap:
            cells.append(_pm(*row.stat("loss_gap"), ".4g"))
        if accuracy:
            cells.append(_pm(*row.stat("test_accuracy"), ".4f"))
        cells.append(_pm(*row.stat("grad_norm_sq"), ".4g"))
        uplink_mean, uplink_half = row.stat("bytes_uplink")
        cells.append(
            f"{uplink_mean:.0f}"
            if uplink_half in (0, math.inf)
            else _pm(uplink_mean, uplink_half, ".0f")
        )
        if set(row.tuned) <= {LR}:
            tried = ", ".join(f"{lr:g}" for lr in row.tried)
            cells.append(f"{row.lr:g} (of {tried})")
        else:
            cells.append(f"{_tuned_text(row)} (of {row.settings_tried})")
        cells.append(str(len(row.runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrices(rows: Sequence[Row], metric: str) -> list[str]:
    """The metric at a glance: per aggregator (and panel setting), a methods × attacks table of
    the mean ± 95 % half-width, each with its chosen setting; the per-attack tables below hold
    the rest."""
    names = attacks(rows)
    lines = []
    for aggregator, panel in dict.fromkeys((row.aggregator, row.panel) for row in rows):
        where = _where(aggregator, panel)
        cells = {
            (row.name, row.attack): f"{_pm(*row.stat(metric), '.4g')} ({_tuned_text(row)})"
            for row in rows
            if (row.aggregator, row.panel) == (aggregator, panel)
        }
        methods = list(dict.fromkeys(name for name, _ in cells))
        lines += ["", f"**{where}** — final {metric}", ""]
        lines += ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for method in methods:
            values = [cells.get((method, attack), "—") for attack in names]
            lines.append(f"| {method} | " + " | ".join(values) + " |")
    return lines


def versus(rows: Sequence[Row], objective: Objective, pair: tuple[str, str]) -> list[str]:
    """A against B: two methods in every aggregator × attack cell where both have a row, or two
    aggregators (as the rows name them, e.g. nnm+cm) in every method × attack cell. `a` where a's
    interval lies entirely on the better side of b's, `b` the other way, `≈` where they overlap;
    then the count of each. The only head-to-head verdicts the data supports."""
    a, b = pair
    compared, across = _versus_axes(rows, pair)
    names = attacks(rows)
    by_cell = {
        (getattr(row, compared), getattr(row, across), row.panel, row.attack): row for row in rows
    }
    groups = list(dict.fromkeys((getattr(row, across), row.panel) for row in rows))
    lines = [
        f"**{a} against {b}** (final {objective.metric}: the better {compared} where the 95 % "
        "intervals are disjoint, ≈ where they overlap)",
        "",
        f"| {across} | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    counts = {a: 0, b: 0, "≈": 0}
    for where_key, panel in groups:
        cells = []
        for attack in names:
            first = by_cell.get((a, where_key, panel, attack))
            second = by_cell.get((b, where_key, panel, attack))
            if first is None or second is None:
                cells.append("—")
                continue
            mine, theirs = first.stat(objective.metric), second.stat(objective.metric)
            verdict = (
                a if objective.separates(mine, theirs)
                else b if objective.separates(theirs, mine)
                else "≈"
            )  # fmt: skip
            counts[verdict] += 1
            cells.append(verdict)
        lines.append(f"| {_where(where_key, panel)} | " + " | ".join(cells) + " |")
    lines += ["", f"{a} better in {counts[a]}, {b} better in {counts[b]}, "
                  f"cannot tell in {counts['≈']} of {sum(counts.values())} cells."]  # fmt: skip
    return lines


def _versus_axes(rows: Sequence[Row], pair: tuple[str, str]) -> tuple[str, str]:
    """("method", "aggregator") when both names of `pair` are methods of `rows`, ("aggregator",
    "method") when both are aggregators; ReportError naming the first name that is neither, or
    the mixed pair."""
    for compared, across in (("method", "aggregator"), ("aggregator", "method")):
        if all(any(getattr(row, compared) == name for row in rows) for name in pair):
            return compared, across
    known = {row.method for row in rows} | {row.aggregator for row in rows}
    unknown = [name for name in pair if name not in known]
    if unknown:
        raise ReportError(f"versus: no row of method or aggregator {unknown[0]!r}")
    raise ReportError(f"versus: {pair[0]}:{pair[1]} pairs a method with an aggregator")


def ordering(rows: Sequence[Row], objective: Objective) -> list[str]:
    """Per aggregator (and setting), the methods from best to worst mean final metric, joined by
    `<` (better, intervals disjoint) or `≈` (intervals overlap): the only ranking the data
    supports. One line each; none for a single method."""
    lines = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.aggregator, row.setting), []).append(row)
    for (aggregator, setting), group in groups.items():
        if len(group) < 2:
            continue
        stats = {id(row): row.stat(objective.metric) for row in group}
        sign = 1.0 if objective.lower_is_better else -1.0
        ranked = sorted(group, key=lambda row: sign * stats[id(row)][0])
        text = _ranked(ranked[0], stats[id(ranked[0])])
        for better, worse in itertools.pairwise(ranked):
            separated = objective.separates(stats[id(better)], stats[id(worse)])
            text += f" {'<' if separated else '≈'} " + _ranked(worse, stats[id(worse)])
        where = _where(aggregator, setting)
        if not objective.lower_is_better:
            text += " (higher is better)"
        lines.append(f"- {where}: {text}")
    return lines


def _ranked(row: Row, stat: tuple[float, float]) -> str:
    return f"{row.name} ({_pm(*stat, '.5g')})"


def plot(rows: Sequence[Row], metric: str, x_axis: str, path: Path) -> None:
    """A panel per attack (columns) and per aggregator and setting (rows), a line per method
    (mean over seeds) with its 95 % interval shaded; a method keeps its colour in every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = attacks(rows)
    groups = list(dict.fromkeys((row.aggregator, row.panel) for row in rows))
    methods = list(dict.fromkeys(row.name for row in rows))
    figure = Figure(figsize=(5.0 * len(names), 4.0 * len(groups)), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without touching pyplot's global backend
    panels = figure.subplots(len(groups), len(names), squeeze=False)
    log_y = metric in LOWER_IS_BETTER
    for (aggregator, panel), axes in zip(groups, panels, strict=True):
        for ax, attack in zip(axes, names, strict=True):
            mine = [
                r for r in rows if (r.attack, r.aggregator, r.panel) == (attack, aggregator, panel)
            ]
            for row in mine:
                rounds, bits, mean, half = seed_band(row, metric)
                x = rounds if x_axis == "rounds" else bits
                colour = f"C{methods.index(row.name) % 10}"
                ax.plot(x, mean, color=colour, label=f"{row.name} ({_tuned_text(row)})")
                low = np.maximum(mean - half, mean * 1e-3) if log_y else mean - half
                ax.fill_between(x, low, mean + half, color=colour, alpha=0.2, linewidth=0)
            where = _where(aggregator, panel)
            # Wrapped: a panel is ~60 characters wide, and a setting such as a compressor's
            # params would otherwise run into the next panel's title.
            title = textwrap.fill(f"attack: {attack} | {where}", TITLE_WIDTH)
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("round" if x_axis == "rounds" else "bits sent per worker (uplink)")
            ax.set_ylabel(metric)
            if log_y:
                ax.set_yscale("log")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.grid(True, alpha=0.3)
            if mine:
                ax.legend(fontsize="x-small")
    save_png(figure, path)


def settings_were_chosen(rows: Sequence[Row], pending: Sequence[str]) -> bool:
    """Whether the report chose among settings: some row tried more than one, or rows wait for
    their reported seeds (`pending` exists only when selection seeds chose their settings)."""
    return bool(pending) or any(row.settings_tried > 1 for row in rows)


def plot_names(metric: str) -> dict[str, str]:
    """Deterministic plot file names by x axis."""
    return {x: f"{metric}_vs_{x}.png" for x in ("rounds", "bits")}


def render(
    rows: Sequence[Row],
    objective: Objective,
    commands: Sequence[str],
    plots: dict[str, str],
    heading: Sequence[str] = ("# Sweep report",),
    selection: Selection = Selection(),
    pending: Sequence[str] = (),
    pairs: Sequence[tuple[str, str]] = (),
) -> str:
    """report.md: its heading, the selection rule, the commands that regenerate it, a table and
    the intervals' ordering per attack, the plots."""
    out = [
        *heading,
        "",
        f"**Selection rule:** {objective.rule()}; "
        f"{selection.describe(chosen=settings_were_chosen(rows, pending))}.",
        "Table entries are the mean ± the half-width of its 95 % Student t interval over the "
        "reported seeds (a single seed shows its value alone) of the final evaluation at the "
        "chosen setting; `lr` lists the chosen value and every value tried (`chosen`: the "
        "chosen value of each tuned key, and how many settings were tried). Under each table, "
        f"the rows ordered by mean final {objective.metric}, with `<` only where the two "
        "intervals are disjoint and `≈` where they overlap (the data cannot order them).",
        *(
            [
                "A method's name carries `[key=value]` for a setting it runs with everywhere "
                "and that most methods do not (a baseline's own compressor); it is part of the "
                "method, so those rows are ordered with the others."
            ]
            if any(row.variant for row in rows)
            else []
        ),
        *(
            [
                "",
                f"**Not in the tables ({len(pending)} rows):** their chosen setting has no run "
                "on a reported seed yet (the study's second stage has not reached them):",
                "",
                *(f"- {text}" for text in pending),
            ]
            if pending
            else []
        ),
        "",
        "Regenerate with:",
        "",
        "```sh",
        *commands,
        "```",
    ]
    if len(attacks(rows)) > 1:
        out += ["", "## Summary", *matrices(rows, objective.metric)]
    if pairs:
        out += ["", "## Head to head"]
        for pair in pairs:
            out += ["", *versus(rows, objective, pair)]
    for attack in attacks(rows):
        mine = [r for r in rows if r.attack == attack]
        out += ["", f"## attack: {attack}", "", table(mine), "", *ordering(mine, objective)]
    out += ["", "## Curves", ""]
    for x_axis, file in plots.items():
        out += [f"![{objective.metric} vs {x_axis}]({file})", ""]
    return "\n".join(out)


def sweep_commands(sweep_dir: Path) -> list[str]:
    """The commands the sweep manifests record: grid.json's, then any later stage's
    (grid.<stem>.json, `cli.sweep.manifest_path`) in the order they were written; none when the
    runs were not made by `byzps sweep`."""
    stages = sorted(sweep_dir.glob("grid.*.json"), key=lambda p: p.stat().st_mtime_ns)
    commands = []
    for path in [sweep_dir / "grid.json", *stages]:
        try:
            commands.append(shlex.join(json.loads(path.read_text())["command"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return commands


def heading(sweep_dir: Path, runs: Sequence[Run], from_sweep: bool) -> list[str]:
    """What the report is of: a sweep's grid, or runs made one by one (`byzps simulate`,
    `byzps launch`), which have no grid to regenerate them from."""
    if from_sweep:
        return ["# Sweep report"]
    title = "# Run report" if len(runs) == 1 else "# Report of separate runs"
    what = "one run" if len(runs) == 1 else f"{len(runs)} runs"
    return [
        title,
        "",
        f"Of {what} found under `{sweep_dir}`, made one by one (not by `byzps sweep`), so "
        "there is no grid to regenerate them from.",
    ]


def write_report(
    sweep_dir: Path,
    out: Path,
    objective: Objective,
    report_command: str,
    selection: Selection = Selection(),
    pending: list[str] | None = None,
    pairs: Sequence[tuple[str, str]] = (),
) -> list[Row]:
    """Load, aggregate and write report.md and its plots into `out`; returns the rows. `pairs`
    add head-to-head verdicts (`versus`). With a `pending` list, rows whose reported seeds have
    not run yet are listed there and in the report instead of refusing it (`build_rows`)."""
    runs = load_runs(sweep_dir)
    if any(objective.metric not in run.final for run in runs):
        raise ReportError(f"metric: some runs in {sweep_dir} have no {objective.metric}")
    missing = [k for k in selection.keys if any(k not in run.config for run in runs)]
    if missing:
        raise ReportError(f"tune: some runs in {sweep_dir} have no {', '.join(missing)}")
    rows = build_rows(runs, objective, selection, pending)
    for pair in pairs:
        _versus_axes(rows, pair)  # refuses a bad pair before anything is written
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_names(objective.metric) if rows else {}  # every row pending: nothing to draw
    for x_axis, file in plots.items():
        plot(rows, objective.metric, x_axis, out / file)
    made_by = sweep_commands(sweep_dir)
    title = heading(sweep_dir, runs, bool(made_by))
    commands = [*made_by, report_command]
    text = render(rows, objective, commands, plots, title, selection, pending or [], pairs)
    text = "\n".join([text, *claims.section(rows, out), *suspicion.section(rows, out)])
    (out / "report.md").write_text(text + "\n")
    return rows
