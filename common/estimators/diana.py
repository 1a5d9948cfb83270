"""BR-DIANA: compressed gradient differences against a learned shift h (rule "diana")."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from byzps.common.compressors import Compressor
from byzps.common.estimators.base import ESTIMATORS, GradientOracle
from byzps.common.estimators.core import MirroredEstimator, check_unit_interval, require_unbiased


@ESTIMATORS.register("br-diana")
class BRDiana(MirroredEstimator):
    r"""BR-DIANA with s^t = ∇f_i(x^t; ξ^t) and Q unbiased with variance factor ω:

    .. math::
        c^t = Q(s^t - h^t)\quad\text{(sent)},\qquad h^{t+1} = h^t + a\,c^t\quad\text{(commit)},
        \qquad h^0 = 0,\; a = 1/(\omega + 1) \text{ by default}.

    The server candidate is h_j + c_j (`DianaRule`), so the shift h is mirrored exactly.
    """

    server_rule = "diana"
    _state_names = ("h",)
    _mirror = "h"

    def __init__(
        self, dim: int, compressor: Compressor, *, a: float | None = None, **common: Any
    ) -> None:
        require_unbiased(self.name, compressor)
        super().__init__(dim, compressor, **common)
        self.a = check_unit_interval("a", 1.0 / (compressor.omega + 1.0) if a is None else a)
        self.commit_scale = self.a

    def _delta(self, x: Tensor, oracle: GradientOracle, round: int) -> tuple[Tensor, Tensor]:
        return self.grad(oracle, x, oracle.sample(round)), self.h

    def server_rule_params(self) -> dict[str, Any]:
        return {"a": self.a}
