"""The attack interface: how a Byzantine cohort picks the candidate rows the server will see.

A Byzantine worker j chooses a target t_j for its candidate (the row the server aggregates for it,
see byzps.common.server_rules) and sends C(t_j − b_j) through the same compressor, k_max and wire
format as an honest worker. Attacks differ only in how they choose t_j from what they know.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from byzps.common.registry import Registry

ATTACKS: Registry[Attack] = Registry("attack")


@dataclass(frozen=True)
class AttackView:
    """What the cohort knows when it picks its targets for one round.

    honest: (h, d) honest candidates — the true honest rows when the attack is omniscient, or the
        cohort's own honest shadow candidates (computed on its members' data) otherwise.
    shadow: (m, d) the honest candidates each Byzantine member would have had, from its own data.
    bases:  (m, d) each Byzantine member's current server-side base b_j (known exactly).
    n, f:   total number of workers and of Byzantine workers (m = f here).
    generator: the cohort's random source for this round (keyed by run seed and round).
    gain:   what the cohort's compressor multiplies a kept coordinate of t − b by this round
        (d/k for Rand-k under a non-accumulating rule; 1 for Top-k, dense rounds, and Rand-k
        under the "state" rule, whose messages the cohort scales back by 1/(ω + 1)). Attacks
        that aim at the message values themselves, not at the candidates (overflow), divide
        by it so the sent values come out as intended.
    """

    honest: Tensor
    shadow: Tensor
    bases: Tensor
    n: int
    f: int
    generator: torch.Generator
    gain: float = 1.0


class Attack(ABC):
    """Chooses the (m, d) target candidates of the m Byzantine members."""

    name: ClassVar[str]
    #: The honest shadow estimator runs on labels y → (C − 1) − y (label flipping).
    flips_labels: ClassVar[bool] = False
    #: The attack needs honest statistics (omniscient or pooled shadow ones).
    uses_honest: ClassVar[bool] = False

    @abstractmethod
    def targets(self, view: AttackView) -> Tensor:
        """(m, d) target candidates."""
