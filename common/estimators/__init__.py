"""Worker-side estimators: Byz-DM21, Byz-VR-DM21 and the baselines (docs/algorithms.md,
"Estimators").

Importing this package registers every estimator in ESTIMATORS.
"""

from __future__ import annotations

from typing import Any

from byzps.common.compressors import Compressor
from byzps.common.estimators.base import ESTIMATORS, Estimator, GradientOracle
from byzps.common.estimators.diana import BRDiana
from byzps.common.estimators.dm21 import ByzDM21, ByzVRDM21
from byzps.common.estimators.ef21 import ByzEF21, ByzEF21SGDM
from byzps.common.estimators.page import ByzDashaPage, ByzVRMarina
from byzps.common.estimators.robust_sgd import BRCSGD, BRSGDm

__all__ = [
    "BRCSGD",
    "ESTIMATORS",
    "BRDiana",
    "BRSGDm",
    "ByzDM21",
    "ByzDashaPage",
    "ByzEF21",
    "ByzEF21SGDM",
    "ByzVRDM21",
    "ByzVRMarina",
    "Estimator",
    "GradientOracle",
    "build_estimator",
]


def build_estimator(name: str, dim: int, compressor: Compressor, **params: Any) -> Estimator:
    """Construct estimator `name`; an unknown or bad parameter is a ValueError naming it (the
    registry follows `**common` up to BatchedEstimator, so the shared arguments count too)."""
    return ESTIMATORS.build(name, dim=dim, compressor=compressor, **params)
