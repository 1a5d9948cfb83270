"""Iteration complexity of Byz-DM21 and Byz-VR-DM21, measured (issue 14, item 2).

    python experiments/claims/complexity/run.py [--out docs/results/claims/complexity]
    python experiments/claims/complexity/run.py --base experiments/claims/complexity-a9a/base.toml \
        --plan experiments/claims/complexity-a9a/sweep.toml --out docs/results/claims/complexity-a9a

The first is the quadratic (σ, L in closed form), the second a9a with the non-convex regulariser
(σ estimated at x⁰, L a bound; sim/complexity.py, noise_and_smoothness).

For every method and ε of sweep.toml, runs base.toml with the step sizes prescribed for ε until
‖∇f(x_t)‖² ≤ ε² (or the cap), over the seeds; fits log rounds against log ε and writes report.md,
complexity.png and hits.json (the raw first-hit times) into --out. --from-hits renders the report
again from a hits.json without running anything. The logic lives in byzps.sim.complexity.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.sim import complexity as cx

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = Path("docs/results/claims/complexity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=HERE / "base.toml", help="the run config")
    parser.add_argument("--plan", type=Path, default=HERE / "sweep.toml", help="constants, grids")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report directory")
    parser.add_argument("--from-hits", type=Path, help="render from this hits.json, run nothing")
    return parser.parse_args(argv)


def progress(hit: cx.Hit) -> None:
    print(
        f"{hit.method:12s} eps={hit.eps:.4g} seed={hit.seed} rounds={hit.rounds} "
        f"{hit.status} ({hit.seconds:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def invocation() -> str:
    """The command line as typed, with the niceness it ran under (the budget asks for nice)."""
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness else ""
    return prefix + shlex.join(["python", *sys.argv])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = RunConfig.load(args.base)
    sigma, L = cx.noise_and_smoothness(base, build_run_task(base))
    plan = cx.load_plan(args.plan, sigma, L)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_hits is not None:
        hits, command, wall = cx.load_hits(args.from_hits)
    else:
        command = invocation()
        started = time.perf_counter()
        hits = cx.run_plan(base, plan, progress)
        wall = time.perf_counter() - started
        cx.save_hits(args.out / "hits.json", hits, command, wall)
    fits = {
        m.schedule.method: cx.fit_hits([h for h in hits if h.method == m.schedule.method])
        for m in plan.methods
    }
    model = cx.quadratic_model(base, plan.seeds) if base.task.name == "quadratic" else None
    cx.plot_rounds(plan, hits, fits, model, args.out / "complexity.png")
    notes = cx.report_notes(base, plan)
    report = cx.render_report(base, plan, hits, fits, model, command, wall, notes)
    (args.out / "report.md").write_text(report)
    for method, fit in fits.items():
        print(cx.fit_summary(method, fit))


if __name__ == "__main__":
    main()
