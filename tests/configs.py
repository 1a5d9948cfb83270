"""The small a9a run configs the tests share, built in one place.

Many tests need a tiny a9a logistic-regression run (Byz-DM21, Top-k, CM after NNM) that differs
only in a few values: seed, rounds, cluster size, step sizes, k, attack. Writing the whole TOML
out by hand in every file let the copies drift apart; here each test names just the values it
cares about, and everything else comes from one template.

    small_config(rounds=300, attack="ipm")     # the nested dict (what RunConfig.from_dict takes)
    to_toml(small_config(...))                 # the same as TOML text
    write_config(tmp_path / "run.toml", ...)   # that text written to a file

A malformed config that a test writes on purpose stays a literal in that test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from byzps.common.config import to_toml

Config = dict[str, dict[str, Any]]


def small_config(
    *,
    seed: int = 3,
    rounds: int = 20,
    eval_every: int | None = 5,
    workers: int = 5,
    byzantine: int = 1,
    lr: float = 0.5,
    eta: float = 0.1,
    k: int = 1,
    aggregator: str = "cm",
    pre: Sequence[str] = ("nnm",),
    attack: str = "alie",
    shards: int = 1,
) -> Config:
    """A tiny a9a run as nested sections; `eval_every=None` leaves it to the config default."""
    run: dict[str, Any] = {"seed": seed, "rounds": rounds}
    if eval_every is not None:
        run["eval_every"] = eval_every
    return {
        "run": run,
        "task": {"name": "a9a-logreg", "batch_size": 1},
        "cluster": {"workers": workers, "byzantine": byzantine}
        | ({"shards": shards} if shards != 1 else {}),
        "algorithm": {"name": "byz-dm21", "lr": lr, "eta": eta},
        "compressor": {"name": "topk", "k": k},
        "aggregator": {"name": aggregator, "pre": list(pre)},
        "attack": {"name": attack},
    }


def write_config(path: Path, **overrides: Any) -> Path:
    """Write `small_config(**overrides)` as TOML to `path` and return `path`."""
    path.write_text(to_toml(small_config(**overrides)))
    return path
