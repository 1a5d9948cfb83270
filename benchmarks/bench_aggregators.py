"""Time every robust aggregator on one (n, d) float32 batch, against the plain mean, the naive
torch.median(dim=0) and, when installed, ByzFL 0.0.11's implementation of the same rule.

    python benchmarks/bench_aggregators.py --n 20 --d 1000000 --f 8 --repeat 5 --device cpu

Each rule is called once to warm up (numba compiles or loads its cache), then `--repeat` times,
each call right after a call of our plain mean on the same input (interleaved, so that a load that
comes and goes on a shared machine weighs on both alike). The table shows the median (and min)
wall time, the bandwidth over the n·d·4 input bytes, the time relative to the mean (the median of
the per-pair ratios) and that as a share of the mean's bandwidth, the speed-up over torch.median
and over ByzFL. `--rules` picks rows of the table by label (e.g. --rules "nnm∘cm" krum).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from byzps.common.aggregators import build_aggregator, forced_backend
from byzps.common.aggregators.ops import band_mean_sorted

Fn = Callable[[torch.Tensor], object]
INSTALL_HINT = "pip install --no-deps byzfl==0.0.11"


@dataclass(frozen=True)
class Case:
    label: str
    ours: Fn
    theirs: Fn | None


def load_byzfl() -> tuple[types.ModuleType | None, str]:
    """ByzFL's aggregator module, or None and why not.

    `import byzfl` also imports its training benchmark, which needs torchvision; installed with
    --no-deps that import fails, so fall back to loading only `byzfl.aggregators`.
    """
    try:
        return importlib.import_module("byzfl.aggregators"), "import byzfl"
    except ModuleNotFoundError as exc:
        spec = importlib.util.find_spec("byzfl")
        if spec is None or not spec.submodule_search_locations:
            return None, f"byzfl is not installed ({exc}); install it with: {INSTALL_HINT}"
        package = types.ModuleType("byzfl")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = package
        try:
            module = importlib.import_module("byzfl.aggregators")
        except ImportError as inner:
            del sys.modules["byzfl"]
            return None, f"byzfl.aggregators does not import ({inner}); try: {INSTALL_HINT}"
        return module, f"byzfl.aggregators only (`import byzfl` failed: {exc})"


def cases(f: int, byzfl: types.ModuleType | None) -> list[Case]:
    def ours(name: str, pre: tuple[str, ...] = (), **params: object) -> Fn:
        return build_aggregator(name, f, pre=pre, params=params)

    def theirs(make: Callable[[types.ModuleType], Fn]) -> Fn | None:
        return None if byzfl is None else make(byzfl)

    def chain(pre: Fn, agg: Fn) -> Fn:
        return lambda x: agg(pre(x))

    def copied(fn: Fn) -> Fn:
        return lambda x: fn(x.clone())

    def nnm_then(inner: Callable[[types.ModuleType], Fn]) -> Callable[[types.ModuleType], Fn]:
        return lambda m: chain(m.NNM(f), inner(m))

    median = lambda m: m.Median()  # noqa: E731
    trmean = lambda m: m.TrMean(f)  # noqa: E731
    gm = lambda m: m.GeometricMedian(nu=0.1, T=8)  # noqa: E731
    return [
        Case("mean", ours("mean"), theirs(lambda m: m.Average())),
        Case("cm", ours("cm"), theirs(median)),
        Case("cwtm", ours("cwtm"), theirs(trmean)),
        Case("krum", ours("krum"), theirs(lambda m: m.Krum(f))),
        Case("multikrum", ours("multikrum"), theirs(lambda m: m.MultiKrum(f))),
        Case("gm", ours("gm"), theirs(gm)),
        Case("cclip", ours("cclip"), theirs(lambda m: m.CenteredClipping(L=3, tau=10.0))),
        Case("bulyan", ours("bulyan"), None),  # ByzFL 0.0.11 has no Bulyan
        Case("mda", ours("mda"), theirs(lambda m: m.MDA(f))),
        # ByzFL's SMEA runs a d-dimensional power step on each of the C(n, f) subsets: ~3 min a
        # call at n = 20, f = 4, d = 1e6, too long for this table (measure it on its own).
        Case("smea", ours("smea"), None),
        Case("monna", ours("monna", pivot=0), theirs(lambda m: m.MoNNA(f))),
        Case("caf", ours("caf"), theirs(lambda m: m.CAF(f))),
        Case("dnc", ours("dnc"), None),  # Blades' DnC is not installed here
        Case("nnm∘cm", ours("cm", ("nnm",)), theirs(nnm_then(median))),
        Case("nnm∘cwtm", ours("cwtm", ("nnm",)), theirs(nnm_then(trmean))),
        Case("nnm∘gm", ours("gm", ("nnm",)), theirs(nnm_then(gm))),
        Case(
            "bucketing∘cm",
            ours("cm", ("bucketing",)),
            theirs(lambda m: chain(m.Bucketing(s=2), m.Median())),
        ),
        Case("meamed", ours("meamed"), theirs(lambda m: m.Meamed(f))),
        Case("nnm∘meamed", ours("meamed", ("nnm",)), theirs(nnm_then(lambda m: m.Meamed(f)))),
        Case("cge", ours("cge"), None),  # ByzFL has no CGE
        # ByzFL's Clipping and ARC scale the caller's tensor in place: they get a copy each call.
        Case(
            "clip∘mean",
            ours("mean", ("clip",), c=2.0),
            theirs(lambda m: chain(copied(m.Clipping(c=2.0)), m.Average())),
        ),
        Case(
            "arc∘cwtm",
            ours("cwtm", ("arc",)),
            theirs(lambda m: chain(copied(m.ARC(f)), trmean(m))),
        ),
        Case("torch.median(dim=0)", lambda x: torch.median(x, dim=0).values, None),
        # Two floors: torch's own mean over the rows, and one read of the input (a full sum).
        Case("torch mean(dim=0)", lambda x: x.mean(0), None),
        Case("read once (x.sum())", lambda x: x.sum(), None),
        # The distance rules' floor: the Gram by the BLAS torch links (MKL on x86), in float64 as
        # ours and in float32. BLAS has no symmetric product in torch, so these compute all n²
        # dot products where ours computes n(n + 1)/2: a symmetric one would take about half.
        Case("Gram f64 (BLAS x·xᵀ)", lambda x: blas_gram(x, torch.float64), None),
        Case("Gram f32 (BLAS x·xᵀ)", lambda x: blas_gram(x, torch.float32), None),
        # cm's two torch formulations, the GPU's fallbacks where Triton is missing.
        Case("cm (torch network)", torch_backend(ours("cm")), None),
        Case("cm (torch.sort)", sorted_median, None),
    ]


#: Columns per BLAS product in `blas_gram`: (100, 65,536) float64 is 52 MB, not the whole copy.
BLAS_COLUMNS = 65_536


def blas_gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x xᵀ summed over column blocks, each converted to `dtype` and multiplied by BLAS, the sum
    kept in float64 (uncentred: centring would only add one pass)."""
    gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for block in x.split(BLAS_COLUMNS, dim=1):
        part = block.to(dtype)
        gram += (part @ part.T).double()
    return gram


def sorted_median(x: torch.Tensor) -> torch.Tensor:
    """cm by torch.sort along the rows."""
    n = x.shape[0]
    return band_mean_sorted(x, (n - 1) // 2, n // 2 + 1)


def torch_backend(fn: Fn) -> Fn:
    """`fn` with every data pass on the torch backend (the comparator network as torch ops)."""

    def run(x: torch.Tensor) -> object:
        with forced_backend("torch"):
            return fn(x)

    return run


def _once(fn: Fn, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn: Fn, x: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(median, min) seconds of `repeat` calls after one warm-up call."""
    _once(fn, x)
    times = [_once(fn, x) for _ in range(repeat)]
    return statistics.median(times), min(times)


def interleaved(
    fn: Fn, mean: Fn, x: torch.Tensor, repeat: int
) -> tuple[tuple[float, float], float]:
    """((median, min) seconds of `repeat` calls of fn, median of fn's time over the mean's), each
    call of fn timed right after one of `mean`, both warmed up first."""
    _once(mean, x)
    _once(fn, x)
    pairs = [(_once(mean, x), _once(fn, x)) for _ in range(repeat)]
    times = [t for _, t in pairs]
    ratio = statistics.median(t / m for m, t in pairs)
    return (statistics.median(times), min(times)), ratio


def measured(
    case: Case, mean: Fn, x: torch.Tensor, repeat: int
) -> tuple[tuple[float, float], float] | None:
    """`interleaved` for our side of `case`; None when the GPU ran out of memory (a rule whose
    temporaries do not fit at this size: the table says so and goes on)."""
    try:
        return interleaved(case.ours, mean, x, repeat)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--f", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rules", nargs="*", help="labels of the rules to time (default: all)")
    args = parser.parse_args(argv)

    print("$", shlex.join([Path(sys.executable).name, *sys.argv]))
    byzfl, how = load_byzfl()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ByzFL: {how}")
    # Drawn where it is used: 100 × 1e8 normals take minutes on a CPU, milliseconds on a GPU.
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.randn(args.n, args.d, generator=gen, device=args.device)
    gigabytes = args.n * args.d * 4 / 1e9
    size = f"{gigabytes * 1e3:.0f} MB"
    print(f"input: n={args.n}, d={args.d}, f={args.f}, float32, {size} on {x.device}")

    # All of ours first, then all of ByzFL's: torch's and numba's OpenMP pools are separate, and a
    # pool still spinning after its last parallel region slows the other one down for a moment.
    table = cases(args.f, byzfl)
    mean_fn = table[0].ours
    if args.rules:
        unknown = set(args.rules) - {case.label for case in table}
        if unknown:
            parser.error(f"unknown rules {sorted(unknown)}; known: {[c.label for c in table]}")
        table = [case for case in table if case.label in args.rules]
    ours = [measured(case, mean_fn, x, args.repeat) for case in table]
    theirs = [timed(c.theirs, x, args.repeat) if c.theirs else None for c in table]
    naive = next(
        (o[0][0] for c, o in zip(table, ours, strict=True) if c.label.startswith("torch")), None
    )

    header = (
        f"{'rule':<20} {'median s':>9} {'min s':>9} {'GB/s':>7} {'x mean':>7} {'% mean':>7} "
        f"{'vs median':>9} {'ByzFL s':>9} {'ours/ByzFL':>10}"
    )
    print(header)
    print("-" * len(header))
    for case, result, theirs_t in zip(table, ours, theirs, strict=True):
        if result is None:
            print(f"{case.label:<20} {'out of memory':>9}")
            continue
        (med, low), ratio = result
        byz = (
            f"{theirs_t[0]:>9.4f} {theirs_t[0] / med:>9.1f}x" if theirs_t else f"{'-':>9} {'-':>10}"
        )
        vs = f"{naive / med:>8.1f}x" if naive else f"{'-':>9}"
        print(
            f"{case.label:<20} {med:>9.4f} {low:>9.4f} {gigabytes / med:>7.1f} {ratio:>7.2f} "
            f"{100 / ratio:>6.0f}% {vs} {byz}"
        )
    if byzfl is None:
        print(f"ByzFL not available: {how}")
    print(
        "x mean: median over calls of time / the time of the mean call just before it; % mean: the "
        "share of the mean's bandwidth (100 / x mean); vs median: torch.median(dim=0) time / time; "
        "ours/ByzFL: ByzFL time / our time (speed-up)."
    )


if __name__ == "__main__":
    main()
