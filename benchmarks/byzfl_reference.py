"""Freeze ByzFL 0.0.11's outputs on seeded random inputs, as an outside oracle for byzps's rules.

    .venv/bin/pip install --no-deps --target /tmp/byzfl byzfl==0.0.11
    PYTHONPATH=/tmp/byzfl .venv/bin/python benchmarks/byzfl_reference.py --out tests/data

writes tests/data/byzfl_reference.npz (inputs and outputs, float64) and byzfl_reference.json (the
cases, their parameters, ByzFL's and numpy's versions). `tests/test_byzfl_oracle.py` checks byzps
against these files in the default suite, and (marked slow) re-runs this script on a fresh install
to prove the files are exactly what ByzFL outputs. `--no-deps`: `import byzfl` pulls torchvision,
so only `byzfl.aggregators` is loaded (`load_byzfl`); it needs numpy, scipy and torch, all in the
venv. Runs in about half a minute (MDA and SMEA enumerate C(20, 8) subsets in Python).

Inputs: seven (n, d, f) shapes from (5, 3, 1) to (15, 1000, 4) and (20, 300, 8), of different
kinds — Gaussian, a 1e3 offset, tiny values, rows of scales 1e-2..1e2, small integers with
duplicated rows (coordinate ties, equal distances), a far colluding cluster, ALIE-like copies.
Every ByzFL 0.0.11 aggregator (Average, Median, TrMean, GeometricMedian, Krum, MultiKrum,
CenteredClipping, MDA, MoNNA, Meamed, CAF, SMEA) runs on every input, and every pre-aggregator
(NNM, Bucketing, Clipping, ARC) runs followed by Average, Median and TrMean; ByzFL 0.0.11 has no
Bulyan, CGE or DnC. ByzFL runs on numpy float64 (its torch path casts to float32). Its random
parts — Bucketing's permutation, CAF's and SMEA's power-iteration start — come from numpy's global
generator, seeded before every call; CAF and SMEA run under five seeds (their outputs differ by
seed), and each Bucketing case stores the permutation it used.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_aggregators import load_byzfl

#: Files written into --out.
NPZ, JSON = "byzfl_reference.npz", "byzfl_reference.json"
#: GeometricMedian's iterations: enough for its Weiszfeld iterates to converge (it has no
#: stopping test); T + 1 steps are stored too, their difference is the residual it leaves.
GM_STEPS = 4000
#: Seeds CAF and SMEA are run under (their power iteration starts at np.random.randn).
RANDOM_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Input:
    key: str
    n: int
    d: int
    f: int
    kind: str


INPUTS = (
    Input("a", 5, 3, 1, "gauss"),
    Input("b", 7, 10, 2, "offset"),
    Input("c", 9, 50, 2, "ties"),
    Input("d", 10, 100, 3, "outliers"),
    Input("e", 12, 20, 0, "tiny"),
    Input("f", 15, 1000, 4, "rowscale"),
    Input("g", 20, 300, 8, "alie"),
)


def draw(spec: Input, seed: int) -> np.ndarray:
    """The (n, d) float64 input of `spec`'s kind, from a generator keyed by `seed`."""
    rng = np.random.default_rng(seed)
    n, d, f = spec.n, spec.d, spec.f
    x = rng.standard_normal((n, d))
    if spec.kind == "offset":
        x = 1e3 + 50.0 * x
    elif spec.kind == "tiny":
        x = 1e-3 * x
    elif spec.kind == "rowscale":
        x *= 10.0 ** rng.uniform(-2, 2, (n, 1))
    elif spec.kind == "ties":
        x = rng.integers(-2, 3, (n, d)).astype(np.float64)
        x[1], x[4] = x[0], x[3]
    elif spec.kind == "outliers":
        x[n - f :] += 30.0
    elif spec.kind == "alie":
        honest = x[: n - f]
        x[n - f :] = honest.mean(axis=0) - 1.5 * honest.std(axis=0)
    return x


@dataclass
class Writer:
    """Collects the cases and arrays; `case` runs ByzFL on one input, seeded."""

    byzfl: types.ModuleType
    arrays: dict[str, np.ndarray]
    cases: list[dict[str, object]]

    def case(
        self,
        spec: Input,
        x: np.ndarray,
        rule: str,
        params: dict[str, object],
        pre: tuple[str, dict[str, object]] | None = None,
        calls: int = 1,
        seeds: tuple[int, ...] = (0,),
    ) -> None:
        """Runs pre then rule (a fresh object per seed, `calls` calls on a copy of x each) and
        stores the outputs, shape (seeds · calls, d) — (·, n, d) for a bare pre-aggregator —
        under out/<id>; an output of None (ByzFL's CAF at f = 0) is stored as NaN and flagged."""
        label = f"{pre[0]}>{rule}" if pre else rule
        key = f"{spec.key}/{label}/" + ",".join(f"{k}={v}" for k, v in params.items())
        if pre:
            key += "/" + ",".join(f"{k}={v}" for k, v in pre[1].items())
        outputs, nothing = [], False
        for seed in seeds:
            np.random.seed(seed)
            agg = getattr(self.byzfl, rule)(**params)
            mix = getattr(self.byzfl, pre[0])(**pre[1]) if pre else None
            for _ in range(calls):
                rows = x.copy()  # Clipping and ARC clip in place
                out = agg(mix(rows) if mix else rows)
                nothing |= out is None  # CAF with f = 0: its filtering loop never runs
                outputs.append(np.full(spec.d, np.nan) if out is None else np.asarray(out))
        self.arrays[f"out/{key}"] = np.stack(outputs).astype(np.float64)
        entry: dict[str, object] = {"id": key, "input": spec.key, "rule": rule, "params": params}
        if nothing:
            entry["returned_none"] = True
        if pre:
            entry["pre"] = {"name": pre[0], "params": pre[1]}
            if pre[0] == "Bucketing":  # the permutation np.random.permutation drew for it
                np.random.seed(seeds[0])
                self.arrays[f"perm/{key}"] = np.random.permutation(spec.n)
        entry.update(calls=calls, seeds=list(seeds))
        self.cases.append(entry)


def rounded(value: float) -> float:
    """`value` to 3 significant digits, so the JSON's parameters read cleanly."""
    return float(f"{value:.3g}")


def generate(byzfl: types.ModuleType, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    writer = Writer(byzfl, {}, [])
    for index, spec in enumerate(INPUTS):
        x = draw(spec, seed * 1000 + index)
        writer.arrays[f"x/{spec.key}"] = x
        f, n = spec.f, spec.n
        spread = np.linalg.norm(x - x.mean(axis=0), axis=1)
        tau = rounded(max(float(np.median(spread)), 1e-3))
        clip = rounded(float(np.median(np.linalg.norm(x, axis=1))))
        run = functools.partial(writer.case, spec, x)
        run("Average", {})
        run("Median", {})
        run("TrMean", {"f": f})
        run("Krum", {"f": f})
        run("MultiKrum", {"f": f})
        run("GeometricMedian", {"nu": 0.1, "T": GM_STEPS})
        run("GeometricMedian", {"nu": 0.1, "T": GM_STEPS + 1})
        run("GeometricMedian", {"nu": 0.1, "T": 3})  # ByzFL's default: not converged
        run("CenteredClipping", {"L": 3, "tau": tau}, calls=2)
        run("MDA", {"f": f})
        run("MoNNA", {"f": f, "idx": 0})
        run("MoNNA", {"f": f, "idx": n - 1})
        run("Meamed", {"f": f})
        run("CAF", {"f": f}, seeds=RANDOM_SEEDS)
        run("SMEA", {"f": f}, seeds=RANDOM_SEEDS)
        run("NNM", {"f": f})
        pres: list[tuple[str, dict[str, object], int]] = [
            ("NNM", {"f": f}, n),
            ("Bucketing", {"s": 2}, math.ceil(n / 2)),
            ("Bucketing", {"s": 3}, math.ceil(n / 3)),
            ("Clipping", {"c": clip}, n),
            ("ARC", {"f": f}, n),
        ]
        for name, pre_params, rows in pres:
            run("Average", {}, pre=(name, pre_params))
            run("Median", {}, pre=(name, pre_params))
            if 2 * f < rows:
                run("TrMean", {"f": f}, pre=(name, pre_params))
    meta = {
        "byzfl": importlib.metadata.version("byzfl"),
        "numpy": np.__version__,
        "seed": seed,
        "gm_steps": GM_STEPS,
        "inputs": {s.key: {"n": s.n, "d": s.d, "f": s.f, "kind": s.kind} for s in INPUTS},
        "cases": writer.cases,
    }
    return writer.arrays, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the two files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    byzfl, how = load_byzfl()
    if byzfl is None:
        raise SystemExit(how)
    arrays, meta = generate(byzfl, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / NPZ, **arrays)
    (args.out / JSON).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(meta['cases'])} cases, ByzFL {meta['byzfl']} ({how}) -> {args.out}")


if __name__ == "__main__":
    main()
