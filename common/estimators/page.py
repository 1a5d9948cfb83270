"""Byz-VR-MARINA and Byz-DASHA-PAGE: estimators driven by the shared full-gradient coin."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from byzps.common.compressors import Compressor, dense_batch
from byzps.common.estimators.base import ESTIMATORS, GradientOracle
from byzps.common.estimators.core import (
    BatchedEstimator,
    MirroredEstimator,
    check_unit_interval,
    require_unbiased,
)
from byzps.common.server_rules import full_gradient_round
from byzps.common.sparse import SparseBatch


class _SharedCoin(BatchedEstimator):
    """Holds p (default k/d) and the run-wide coin of round t; keeps x^{t−1} for the differences
    ∇f_i(x^t; ξ^t) − ∇f_i(x^{t−1}; ξ^t) on one mini-batch."""

    _keeps_prev_model = True
    _shared_coin = True
    coin_key = "marina"

    def __init__(
        self, dim: int, compressor: Compressor, *, p: float | None = None, **common: Any
    ) -> None:
        require_unbiased(self.name, compressor)
        super().__init__(dim, compressor, **common)
        self.p = check_unit_interval("p", compressor.k / dim if p is None else p)

    def is_full(self, round: int) -> bool:
        return full_gradient_round(self.seed, round, self.p, self.coin_key)

    def grad_difference(self, x: Tensor, oracle: GradientOracle, round: int) -> Tensor:
        """∇f_i(x^t; ξ^t) − ∇f_i(x^{t−1}; ξ^t) on one mini-batch (0 while there is no x^{t−1})."""
        if self.x_prev is None:
            return torch.zeros(self.num_workers, self.dim, dtype=self.dtype, device=self.device)
        batch = oracle.sample(round)
        return self.grad(oracle, x, batch) - self.grad(oracle, self.x_prev, batch)


@ESTIMATORS.register("byz-vr-marina")
class ByzVRMarina(_SharedCoin):
    r"""Byz-VR-MARINA. With the shared coin c_t (round 0 always full, else P[c_t] = p):

    .. math::
        \text{message}^t = \begin{cases}
            \nabla f_i(x^t) & \text{if } c_t \text{ (dense, nnz = d)}\\
            Q\big(\nabla f_i(x^t;\xi^t) - \nabla f_i(x^{t-1};\xi^t)\big) & \text{otherwise,}
        \end{cases}

    and the server (`MarinaRule`) forms g_i^t = message (full round) or ĝ^{t−1} + message.
    Full rounds are dense by design: `max_nnz(t)` is d there, so the server's k_max check must
    ask the estimator per round. A worker whose first message falls in a delta round has no
    x^{t−1} and sends Q(0), leaving its candidate at ĝ^{t−1}. p defaults to k/d.
    """

    server_rule = "marina"

    def _message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        if self.is_full(round):
            return dense_batch(self.full_grad(oracle, x))
        return self.compress(self.grad_difference(x, oracle, round), round)

    def max_nnz(self, round: int) -> int:
        return self.dim if self.is_full(round) else self.compressor.k

    def server_rule_params(self) -> dict[str, Any]:
        return {"p": self.p, "seed": self.seed}


@ESTIMATORS.register("byz-dasha-page")
class ByzDashaPage(_SharedCoin, MirroredEstimator):
    r"""Byz-DASHA-PAGE (Tyurin & Richtárik), with h the PAGE estimator and g the server mirror:

    .. math::
        h^{t+1} &= \begin{cases} \nabla f_i(x^t) & \text{if } c_t \text{ (shared coin, round 0
                    always, P = p)} \\
                    h^t + \nabla f_i(x^t;\xi^t) - \nabla f_i(x^{t-1};\xi^t) & \text{otherwise}
                  \end{cases} \\
        m^t &= Q\big(h^{t+1} - h^t - a\,(g^t - h^t)\big) \quad\text{(sent)},\qquad
        g^{t+1} = g^t + m^t \quad\text{(commit)},

    starting from h = g = 0 (so the first message is Q(∇f_i(x⁰))); a = 1/(2ω + 1), p = k/d by
    default. h is local and advances at `message`; g moves only at commit (server rule "state").
    The coin is keyed "page" (the server does not need it).
    """

    server_rule = "state"
    coin_key = "page"
    _state_names = ("h", "g")

    def __init__(
        self,
        dim: int,
        compressor: Compressor,
        *,
        a: float | None = None,
        p: float | None = None,
        **common: Any,
    ) -> None:
        super().__init__(dim, compressor, p=p, **common)
        self.a = check_unit_interval("a", 1.0 / (2.0 * compressor.omega + 1.0) if a is None else a)

    def _delta(self, x: Tensor, oracle: GradientOracle, round: int) -> tuple[Tensor, None]:
        if self.is_full(round) or self.first:
            h_new = self.full_grad(oracle, x)
        else:
            h_new = self.h + self.grad_difference(x, oracle, round)
        delta = h_new - self.h - self.a * (self.g - self.h)
        self.h.copy_(h_new)
        return delta, None
