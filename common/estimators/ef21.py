"""Byz-EF21 and Byz-EF21-SGDM: error feedback on a gradient or on one momentum."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from byzps.common.compressors import Compressor
from byzps.common.estimators.base import ESTIMATORS, GradientOracle
from byzps.common.estimators.core import ErrorFeedbackEstimator, check_unit_interval


@ESTIMATORS.register("byz-ef21")
class ByzEF21(ErrorFeedbackEstimator):
    r"""Byz-EF21: error feedback on the full local gradient.

    .. math::
        s^t = \nabla f_i(x^t),\qquad c^t = C(s^t - g^t),\qquad g^{t+1} = g^t + c^t \text{ (commit)},
        \quad g^0 = 0.

    `stochastic=True` uses s^t = ∇f_i(x^t; ξ^t) instead (Byz-DM21 with η = 1 reduces to it).
    """

    _state_names = ("g",)

    def __init__(
        self, dim: int, compressor: Compressor, *, stochastic: bool = False, **common: Any
    ) -> None:
        super().__init__(dim, compressor, **common)
        self.stochastic = bool(stochastic)

    def _target(self, x: Tensor, oracle: GradientOracle, round: int) -> Tensor:
        if self.stochastic:
            return self.grad(oracle, x, oracle.sample(round))
        return self.full_grad(oracle, x)


@ESTIMATORS.register("byz-ef21-sgdm")
class ByzEF21SGDM(ErrorFeedbackEstimator):
    r"""Byz-EF21-SGDM: error feedback on one momentum of stochastic gradients s^t = ∇f_i(x^t; ξ^t).

    .. math::
        v^0 = s^0,\quad v^t = (1-\eta) v^{t-1} + \eta s^t,\qquad
        c^t = C(v^t - g^t),\qquad g^{t+1} = g^t + c^t \text{ (commit)}.
    """

    _state_names = ("v", "g")

    def __init__(
        self, dim: int, compressor: Compressor, *, eta: float = 0.1, **common: Any
    ) -> None:
        super().__init__(dim, compressor, **common)
        self.eta = check_unit_interval("eta", eta)

    def _target(self, x: Tensor, oracle: GradientOracle, round: int) -> Tensor:
        return self._track("v", self.grad(oracle, x, oracle.sample(round)), self.eta)
