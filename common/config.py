"""Run configuration: one TOML file describes a run; every key is typed and validated on load.

Why strict: a typo in an experiment grid (`ratoi = 0.1`) that silently falls back to a default
wastes hours and produces wrong tables. So an unknown key, a wrong type or an impossible
combination is refused with a ConfigError that names the key (`compressor.ratoi`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


@dataclass(frozen=True)
class RunSection:
    #: Run seed. Every random draw (data split, mini-batches, model init, Rand-k coordinates,
    #: shared coins, bucketing, attack noise) is keyed by it, so one seed gives one trajectory.
    seed: int = 0
    #: Rounds T to run; the model published after round T is the result.
    rounds: int = 1000
    #: Evaluate the model (a metrics.jsonl record) every this many rounds, plus rounds 0 and T.
    eval_every: int = 100
    #: Where this process keeps the model, the per-worker states and the aggregation: "cpu",
    #: "cuda" or "cuda:N" (`byzps server --device`, `byzps simulate --device`). A placement, not
    #: part of the experiment: the config digest leaves it out, so a GPU server takes CPU workers.
    device: str = "cpu"


@dataclass(frozen=True)
class TaskSection:
    #: Model, data and loss, by registered name (`byzps components` lists them).
    name: str = "a9a-logreg"
    #: a9a only: "l2" or "nonconvex" (ignored by tasks without a regulariser).
    regularizer: str = "l2"
    #: Regularisation weight; None takes the task's default (5.6e-4 for l2, 0.1 for nonconvex).
    lam: float | None = None
    #: Rows per mini-batch per worker and gradient evaluation, drawn from the worker's own shard
    #: as `sampling` says ("quadratic": scales its gradient noise by 1/√batch_size).
    batch_size: int = 1
    #: How a worker draws its mini-batches: "replace" (uniformly with replacement) or "shuffle"
    #: (through a permutation of its shard without replacement, reshuffled at every pass: the
    #: authors' protocol, which the paper experiments in experiments/a9a and experiments/fmnist
    #: use so that their numbers compare with the authors'). Either is a pure function of
    #: (seed, worker, round).
    sampling: str = "replace"
    #: How training rows are dealt to workers: "iid", "sorted-mix" (half label-sorted, half
    #: IID: the authors' heterogeneous split) or "dirichlet".
    split: str = "iid"
    #: Dirichlet concentration (split = "dirichlet" only).
    alpha: float = 1.0
    #: Which workers the training rows are split over: "all" n ids, or the "honest" ones only
    #: (the authors' protocol, used by the paper experiments: the honest workers hold the whole
    #: data set rather than (n − f)/n of it). Under "honest" a Byzantine id j ≥ h draws from
    #: honest shard (j − h) mod h, with batches of its own (label flipping flips those rows).
    split_over: str = "all"
    #: Further task parameters (e.g. dim, noise, heterogeneity for "quadratic").
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterSection:
    #: n: every worker, honest and Byzantine.
    workers: int = 20
    #: f: Byzantine workers, also the f every robust aggregator is declared with. Under an
    #: attack the last f ids (n − f … n − 1) are the Byzantine ones.
    byzantine: int = 0
    #: Pushes that let the server close a round once its deadline has passed (unset: n − f).
    #: A smaller quorum keeps a run going when workers die (with f = 0 the default n would stall
    #: on one dead worker), at the price of rounds aggregated over fewer fresh states: a silent
    #: worker's stale state still counts, so each missing worker adds staleness, not bias.
    quorum: int | None = None
    #: S: server processes, each owning a contiguous 1/S of the coordinates (of x and of every
    #: worker's state; byzps.common.shards). Robust rules decide alike on every shard from
    #: O(n²) partial sums exchanged between them, so results match one server's (bit for bit
    #: for coordinate-wise rules, to float64 rounding of the distances for the others).
    shards: int = 1


@dataclass(frozen=True)
class AlgorithmSection:
    #: Worker-side estimator, by registered name; it also picks the server rule.
    name: str = "byz-dm21"
    #: Step size γ of the server's step x ← x − γ ĝ.
    lr: float = 0.05
    #: Momentum weight η on new information, for the estimators that take one (the authors'
    #: code writes m = 1 − η).
    eta: float = 0.1
    #: Further estimator parameters (e.g. p for byz-vr-marina, authors_init for byz-dm21).
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompressorSection:
    #: Compressor of every message, by registered name; its k is also the server's k_max.
    name: str = "topk"
    #: Non-zeros per message as a count (give exactly one of k and ratio; neither for identity).
    k: int | None = None
    #: Non-zeros per message as a share of d: k = max(1, ⌊ratio · d⌋), per tensor under
    #: scope = "layer".
    ratio: float | None = None
    #: Top-k only: "global" selects over the flat vector, "layer" inside every parameter
    #: tensor (needs ratio).
    scope: str = "global"
    #: Further parameters of the compressor by name (e.g. levels = 4 for qsgd, values =
    #: "float16" for a sparsifier); `byzps components` lists them.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregatorSection:
    #: Robust aggregation rule the server applies to the candidates, by registered name.
    name: str = "cm"
    #: Wrappers applied before the base rule, outermost first (e.g. ["nnm"]).
    pre: list[str] = field(default_factory=list)
    #: Parameters of the rule and of its wrappers: a key goes to the wrapper that takes it
    #: (e.g. bucket_size), the rest to the rule.
    params: dict[str, Any] = field(default_factory=dict)
    #: Half-life in rounds of each worker's suspicion score: an exponentially weighted mean of
    #: how strongly the rule discounted that worker's state each round (docs/algorithms.md,
    #: "Suspicion scores"). 0 turns the scores off.
    suspicion_halflife: float = 100.0
    #: Coordinates sampled per round to score a coordinate-wise rule (cm, cwtm, meamed, Bulyan):
    #: their share of coordinates is estimated on this many; on all of them when d is smaller.
    suspicion_columns: int = 1024


@dataclass(frozen=True)
class AttackSection:
    #: What the Byzantine workers do, by registered name; "na" makes all n workers honest.
    name: str = "na"
    #: "omniscient": the attack sees honest candidates; "cohort": only its own shadows.
    knowledge: str = "omniscient"
    #: Parameters of the attack (e.g. z for alie, epsilon for ipm).
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """One run, section by section. Each field's `#:` comment is its documentation: the config
    reference (docs/config.md, `byzps components --markdown`) is generated from them."""

    #: Seed and length of the run.
    run: RunSection = field(default_factory=RunSection)
    #: The learning problem and how its data is split among the workers.
    task: TaskSection = field(default_factory=TaskSection)
    #: How many workers there are and how many of them are Byzantine.
    cluster: ClusterSection = field(default_factory=ClusterSection)
    #: The workers' estimator and the server's step size.
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    #: How every message is sparsified.
    compressor: CompressorSection = field(default_factory=CompressorSection)
    #: How the server combines the workers' candidates.
    aggregator: AggregatorSection = field(default_factory=AggregatorSection)
    #: The Byzantine workers' strategy.
    attack: AttackSection = field(default_factory=AttackSection)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build and validate a config from nested mappings (the parsed TOML)."""
        config = _build_dataclass(cls, data, prefix="")
        validate(config)
        return config

    @classmethod
    def load(cls, path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
        """Read a TOML file and apply `section.key=value` overrides (values parsed as TOML)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}") from None
        for override in overrides:
            apply_override(data, override)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A stable hash of the resolved config (servers and workers compare it at registration).

        `run.device` is left out: where one process computes is not part of the run (a server on
        a GPU and its workers on CPUs agree on the digest), and digests of configs written before
        the key existed stay the same. `cluster.shards` counts only when it is above 1: workers
        must know it to split their messages, and an unsharded run's digest stays as it was."""
        data = self.to_dict()
        del data["run"]["device"]
        if data["cluster"]["shards"] == 1:  # an unsharded run keeps the digest it always had
            del data["cluster"]["shards"]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def quorum(self) -> int:
        """Pushes that close a round at its deadline: cluster.quorum, else n − f."""
        c = self.cluster
        return c.workers - c.byzantine if c.quorum is None else c.quorum

    @property
    def honest_workers(self) -> int:
        """Workers that run the honest estimator: all n under "na", else n − f."""
        if self.attack.name == "na":
            return self.cluster.workers
        return self.cluster.workers - self.cluster.byzantine


def to_toml(data: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text of a config's nested mapping (what `RunConfig.load` reads back): one table per
    section, nested tables written inline, None values left out (TOML has no null)."""
    sections = []
    for section, values in data.items():
        lines = [f"[{section}]"]
        lines += [f"{key} = {toml_value(v)}" for key, v in values.items() if v is not None]
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def toml_value(value: Any) -> str:
    """A config value as a TOML literal (a table inline, its None entries left out)."""
    if isinstance(value, Mapping):
        items = [f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    return json.dumps(value)  # JSON spells strings, numbers, booleans and lists as TOML does


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as a TOML value
    (so `lr=0.5` is a float, `pre=["nnm"]` a list, and a bare word a string)."""
    key, sep, raw = override.partition("=")
    path = key.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"override {override!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, raw in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build_dataclass(hint, raw, f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation `hint`; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {type(value).__name__}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {hint.__name__}, got bool")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _describe(hint: Any) -> str:
    args = [a.__name__ for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(args)


def validate(config: RunConfig) -> None:
    """Cross-field checks; each failure names its key. (Component names and their parameters are
    checked against the registries by byzps.common.catalog.check_components.)"""
    n, f = config.cluster.workers, config.cluster.byzantine
    _require(config.run.rounds >= 1, "run.rounds", "must be at least 1")
    _require(config.run.eval_every >= 1, "run.eval_every", "must be at least 1")
    _require(config.run.seed >= 0, "run.seed", "must be non-negative")
    _require(
        re.fullmatch(r"cpu|cuda(:\d+)?", config.run.device) is not None,
        "run.device",
        f'unknown device {config.run.device!r} ("cpu", "cuda" or "cuda:N")',
    )
    _require(n >= 1, "cluster.workers", "must be at least 1")
    _require(f >= 0, "cluster.byzantine", "must be non-negative")
    _require(2 * f < n, "cluster.byzantine", f"f = {f} must be below n/2 = {n / 2}")
    q = config.cluster.quorum
    _require(q is None or 1 <= q <= n, "cluster.quorum", f"must be in [1, n = {n}]")
    _require(config.cluster.shards >= 1, "cluster.shards", "must be at least 1")
    _require(config.task.batch_size >= 1, "task.batch_size", "must be at least 1")
    _require(config.task.alpha > 0, "task.alpha", "must be positive")
    _require(
        config.task.split in ("iid", "sorted-mix", "dirichlet"),
        "task.split",
        f"unknown split {config.task.split!r} (iid, sorted-mix, dirichlet)",
    )
    _require(
        config.task.sampling in ("replace", "shuffle"),
        "task.sampling",
        f"unknown sampling {config.task.sampling!r} (replace, shuffle)",
    )
    _require(
        config.task.split_over in ("all", "honest"),
        "task.split_over",
        f"unknown split_over {config.task.split_over!r} (all, honest)",
    )
    _require(config.algorithm.lr > 0, "algorithm.lr", "must be positive")
    _require(0 < config.algorithm.eta <= 1, "algorithm.eta", "must be in (0, 1]")
    c = config.compressor
    _require(c.k is None or c.k >= 1, "compressor.k", "must be at least 1")
    _require(c.ratio is None or 0 < c.ratio <= 1, "compressor.ratio", "must be in (0, 1]")
    _require(c.scope in ("global", "layer"), "compressor.scope", "must be 'global' or 'layer'")
    if c.name in ("identity", "permk", "qsgd", "natural", "natural-dithering", "sign"):
        _require(c.k is None and c.ratio is None, "compressor.k", f"{c.name} takes no k or ratio")
    else:
        _require(
            (c.k is None) != (c.ratio is None),
            "compressor.k",
            f"{c.name} needs exactly one of k and ratio",
        )
    halflife = config.aggregator.suspicion_halflife
    _require(
        math.isfinite(halflife) and halflife >= 0,
        "aggregator.suspicion_halflife",
        "must be a finite number of rounds >= 0 (0: off)",
    )
    _require(config.aggregator.suspicion_columns >= 1, "aggregator.suspicion_columns",
             "must be at least 1")  # fmt: skip
    _require(
        config.attack.knowledge in ("omniscient", "cohort"),
        "attack.knowledge",
        "must be 'omniscient' or 'cohort'",
    )
    if config.cluster.shards > 1:
        from byzps.common.shards import check_shardable  # shards imports this module

        check_shardable(c.name, config.cluster.shards)
    if config.attack.name != "na":
        _require(f >= 1, "cluster.byzantine", f"attack {config.attack.name!r} needs f >= 1")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")
