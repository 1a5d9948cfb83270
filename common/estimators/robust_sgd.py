"""BR-SGDm and BR-CSGD: the server aggregates the messages themselves (rule "message")."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from byzps.common.compressors import Compressor
from byzps.common.estimators.base import ESTIMATORS, GradientOracle
from byzps.common.estimators.core import (
    BatchedEstimator,
    check_unit_interval,
    require_identity,
    require_unbiased,
)
from byzps.common.sparse import SparseBatch


@ESTIMATORS.register("br-sgdm")
class BRSGDm(BatchedEstimator):
    r"""BR-SGDm: robust aggregation of uncompressed momenta (the identity compressor is required).

    .. math::
        m^0 = s^0,\quad m^t = (1-\eta) m^{t-1} + \eta s^t,\quad s^t = \nabla f_i(x^t; \xi^t);
        \qquad \text{send } m^t \text{ dense}.
    """

    server_rule = "message"
    _state_names = ("m",)

    def __init__(
        self, dim: int, compressor: Compressor, *, eta: float = 0.1, **common: Any
    ) -> None:
        require_identity(self.name, compressor)
        super().__init__(dim, compressor, **common)
        self.eta = check_unit_interval("eta", eta)

    def _message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        m = self._track("m", self.grad(oracle, x, oracle.sample(round)), self.eta)
        return self.compress(m, round)


@ESTIMATORS.register("br-csgd")
class BRCSGD(BatchedEstimator):
    r"""BR-CSGD: send Q(s^t), s^t = ∇f_i(x^t; ξ^t), with Q unbiased (Rand-k); no worker state."""

    server_rule = "message"

    def __init__(self, dim: int, compressor: Compressor, **common: Any) -> None:
        require_unbiased(self.name, compressor)
        super().__init__(dim, compressor, **common)

    def _message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        return self.compress(self.grad(oracle, x, oracle.sample(round)), round)
