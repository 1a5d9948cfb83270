"""Robust aggregators (mean, cm, cwtm, meamed, krum, multikrum, gm, cclip, cge) and wrappers
(nnm, bucketing, clip, arc).

Build them from configuration with `build_aggregator`, e.g.
``build_aggregator("cm", f=2, pre=["nnm"])`` is nnm∘cm.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from byzps.common.aggregators.base import AGGREGATORS, Aggregator
from byzps.common.aggregators.bulyan import Bulyan
from byzps.common.aggregators.clipping import AdaptiveRobustClipping, StaticClipping
from byzps.common.aggregators.coordinatewise import (
    CoordinateMedian,
    Mean,
    MeanAroundMedian,
    TrimmedMean,
)
from byzps.common.aggregators.distance import CenteredClipping, GeometricMedian, Krum, MultiKrum
from byzps.common.aggregators.norms import ComparativeGradientElimination
from byzps.common.aggregators.ops import forced_backend
from byzps.common.aggregators.rule import RowsAggregator
from byzps.common.aggregators.spectral import CovarianceAgnosticFilter, DivideAndConquer
from byzps.common.aggregators.subsets import (
    MinimumDiameterAveraging,
    MoNNA,
    SmallestMaxEigenvalueAveraging,
)
from byzps.common.aggregators.wrappers import WRAPPERS, Bucketing, NearestNeighborMixing, Wrapper

__all__ = [
    "AGGREGATORS",
    "WRAPPERS",
    "AdaptiveRobustClipping",
    "Aggregator",
    "Bucketing",
    "Bulyan",
    "CenteredClipping",
    "ComparativeGradientElimination",
    "CoordinateMedian",
    "CovarianceAgnosticFilter",
    "DivideAndConquer",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MeanAroundMedian",
    "MinimumDiameterAveraging",
    "MoNNA",
    "MultiKrum",
    "NearestNeighborMixing",
    "RowsAggregator",
    "SmallestMaxEigenvalueAveraging",
    "StaticClipping",
    "TrimmedMean",
    "Wrapper",
    "build_aggregator",
    "forced_backend",
]

#: Wrapper constructor arguments that build_aggregator supplies itself.
_WIRED = frozenset({"base", "f", "seed"})


def build_aggregator(
    name: str,
    f: int,
    pre: Sequence[str] = (),
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    n: int | None = None,
) -> Aggregator:
    """The rule `name` for f Byzantine inputs, wrapped by `pre` (outermost first); with `n`, the
    number of inputs it will see, checked to tolerate f of them (`RowsAggregator.check`).

    pre=["bucketing", "nnm"] gives bucketing∘nnm∘name: the inputs are bucketed, the buckets mixed,
    then aggregated. `params` holds the base rule's parameters plus the wrappers' own (each key goes
    to the wrapper whose constructor names it, e.g. "bucket_size"); `seed` goes to the wrappers that
    draw random numbers, and to the rule itself when its constructor takes one (dnc). Unknown
    names or parameters raise ValueError naming them.
    """
    base_params = dict(params or {})
    if _WIRED & base_params.keys():
        raise ValueError(f"pass {sorted(_WIRED & base_params.keys())} as arguments, not params")
    wrapper_params = []
    for wrapper in pre:
        accepted = inspect.signature(WRAPPERS.get(wrapper)).parameters
        own = {
            k: base_params.pop(k) for k in list(base_params) if k in accepted and k not in _WIRED
        }
        if "seed" in accepted:
            own["seed"] = seed
        wrapper_params.append(own)
    if "seed" in inspect.signature(AGGREGATORS.get(name)).parameters:
        base_params["seed"] = seed
    aggregator = AGGREGATORS.build(name, f=f, **base_params)
    for wrapper, own in reversed(list(zip(pre, wrapper_params, strict=True))):
        aggregator = WRAPPERS.build(wrapper, base=aggregator, f=f, **own)
    if n is not None:
        aggregator.check(n, f)  # type: ignore[attr-defined]
    return aggregator
