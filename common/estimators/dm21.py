"""Byz-DM21 and Byz-VR-DM21: double momentum with error feedback (docs/algorithms.md#byz-dm21)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from byzps.common.compressors import Compressor
from byzps.common.estimators.base import ESTIMATORS, Batch, GradientOracle
from byzps.common.estimators.core import ErrorFeedbackEstimator, check_unit_interval


@ESTIMATORS.register("byz-dm21")
class ByzDM21(ErrorFeedbackEstimator):
    r"""Byz-DM21 (EF21-SGD2M with robust aggregation of the states g).

    With s^t = ∇f_i(x^t; ξ^t) on a fresh mini-batch:

    .. math::
        t = 0:\quad & v^0 = u^0 = s^0,\; g^0 = 0 \\
        t \ge 1:\quad & v^t = (1-\eta) v^{t-1} + \eta s^t,\quad
                        u^t = (1-\eta) u^{t-1} + \eta v^t \\
        & c^t = C(u^t - g^t) \quad\text{(sent)},\qquad g^{t+1} = g^t + c^t \quad\text{(at commit)}

    `authors_init=True` starts as the authors' code does: v⁰ = η s⁰, u⁰ = η v⁰; the first message
    is then C(u⁰) and g = C(u⁰) after commit — the same C(u − g) form with g = 0.
    η = 1 gives stochastic Byz-EF21; C = identity gives robust double-momentum SGD.
    """

    _state_names = ("v", "u", "g")

    def __init__(
        self,
        dim: int,
        compressor: Compressor,
        *,
        eta: float = 0.1,
        authors_init: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(dim, compressor, **common)
        self.eta = check_unit_interval("eta", eta)
        self.authors_init = bool(authors_init)

    @property
    def _init_scale(self) -> float:
        return self.eta if self.authors_init else 1.0

    def _target(self, x: Tensor, oracle: GradientOracle, round: int) -> Tensor:
        batch = oracle.sample(round)
        s = self.grad(oracle, x, batch, reuse=True)  # read only within this call
        if self.first:
            self._track("v", s, self.eta, self._init_scale)
        else:
            self._first_momentum(x, oracle, batch, s)
        return self._track("u", self.v, self.eta, self._init_scale)

    def _first_momentum(self, x: Tensor, oracle: GradientOracle, batch: Batch, s: Tensor) -> None:
        """v ← (1 − η) v + η s (rounds t ≥ 1)."""
        self._track("v", s, self.eta)


@ESTIMATORS.register("byz-vr-dm21")
class ByzVRDM21(ByzDM21):
    r"""Byz-VR-DM21: Byz-DM21 with a STORM-type first momentum on the SAME mini-batch ξ^t:

    .. math::
        v^t = \nabla f_i(x^t; \xi^t) + (1-\eta)\,(v^{t-1} - \nabla f_i(x^{t-1}; \xi^t)),

    u, c and g as in Byz-DM21. Round 0 (no previous model) uses Byz-DM21's initialisation.
    Two gradient evaluations per round; x^{t−1} is kept (and checkpointed).
    """

    _keeps_prev_model = True

    def _first_momentum(self, x: Tensor, oracle: GradientOracle, batch: Batch, s: Tensor) -> None:
        assert self.x_prev is not None  # set by every message after the first
        s_prev = self.grad(oracle, self.x_prev, batch)
        self.v.sub_(s_prev).mul_(1.0 - self.eta).add_(s)
