"""The attack interface: how a Byzantine cohort picks the candidate rows the server will see.

A Byzantine worker j chooses a target t_j for its candidate (the row the server aggregates for it,
see byzps.common.server_rules) and sends C(t_j − b_j) through the same compressor, k_max and wire
format as an honest worker. Attacks differ only in how they choose t_j from what they know.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from byzps.common.registry import Registry
from byzps.common.seeding import generator

ATTACKS: Registry[Attack] = Registry("attack")


@dataclass(frozen=True)
class AttackView:
    """What the cohort knows when it picks its targets for one round.

    honest: (h, d) honest candidates — the true honest rows when the attack is omniscient, or the
        cohort's own honest shadow candidates (computed on its members' data) otherwise.
    shadow: (m, d) the honest candidates each Byzantine member would have had, from its own data;
        (0, d) when the cohort does not run its shadows, which it skips only when nothing can
        read them (an omniscient attack on the true honest rows, without `uses_shadow`).
    bases:  (m, d) each Byzantine member's current server-side base b_j (known exactly).
    n, f:   total number of workers and of Byzantine workers (m = f here).
    generator: the cohort's random source for this round (keyed by run seed and round). The
        cohort passes None and its keys instead (`generator_keys`): seeding one costs ~50 µs,
        a sixth of an a9a round, and most attacks draw nothing, so it is built on first access.
    gain:   what the cohort's compressor multiplies a kept coordinate of t − b by this round
        (d/k for Rand-k under a non-accumulating rule; 1 for Top-k, dense rounds, and Rand-k
        under the "state" rule, whose messages the cohort scales back by 1/(ω + 1)). Attacks
        that aim at the message values themselves, not at the candidates (overflow), divide
        by it so the sent values come out as intended.
    aggregate: the run's aggregator (with its pre-aggregators, built as the server builds it),
        side-effect free: every call starts from the state the server's aggregator has this
        round (the cohort's best knowledge of it), so a search may call it any number of times.
        It takes (n, d) rows as the server sees them (`rows`). None when the cohort was built
        without the run's aggregator (only attacks with `uses_aggregator` need it).
    """

    honest: Tensor
    shadow: Tensor
    bases: Tensor
    n: int
    f: int
    generator: torch.Generator
    gain: float = 1.0
    aggregate: Callable[[Tensor], Tensor] | None = None
    #: (seed, *keys) of `generator` when it is None: `seeding.generator(*generator_keys)`.
    generator_keys: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            if self.generator_keys is None:
                raise ValueError("an AttackView needs a generator or its generator_keys")
            object.__delattr__(self, "generator")  # from now on `__getattr__` builds it

    def __getattr__(self, name: str) -> torch.Generator:
        """Reached only for a deferred `generator`: build it from its keys, keep it."""
        keys = self.__dict__.get("generator_keys")
        if name != "generator" or keys is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        drawn = generator(*keys)
        object.__setattr__(self, "generator", drawn)
        return drawn

    def rows(self, byzantine: Tensor) -> Tensor:
        """The (n, d) rows the server would aggregate if the members' candidates were
        `byzantine` ((f, d)): the n − f honest rows first, then the Byzantine ones.

        When the cohort stands in for the honest workers with its own m shadows (knowledge
        "cohort"), `honest` has m rows, not n − f: they are repeated cyclically to n − f rows,
        which keeps the honest spread and gives the aggregator as many inputs as the server's.
        """
        h = self.n - self.f
        honest = self.honest
        if honest.shape[0] != h:
            honest = honest[torch.arange(h, device=honest.device) % honest.shape[0]]
        return torch.cat([honest, byzantine.to(honest.dtype)])


@dataclass(frozen=True)
class RunsView:
    """What the cohorts of R runs know in one round, each field of `AttackView` stacked run
    after run in R equal blocks (`honest`, `shadow`, `bases`); `seeds[r]` keys run r's
    generator. A batched simulation (byzps.sim.batched) hands this to `Attack.targets_runs`:
    attacks whose targets are statistics of the honest rows reduce the (R, h, d) stack
    (`stacked`) in one call, the others ask `view(r)` run by run. Building R views a round
    cost ~7 µs each at R = 16 (three tensor views and a frozen dataclass), so they are built
    only when an attack asks for them. One run is R = 1: `view(0)` holds the tensors as given.
    """

    honest: Tensor
    shadow: Tensor
    bases: Tensor
    seeds: Sequence[int]
    round: int
    n: int
    f: int
    gain: float = 1.0
    aggregate: Callable[[Tensor], Tensor] | None = None

    @property
    def runs(self) -> int:
        return len(self.seeds)

    @staticmethod
    def stacked(rows: Tensor, runs: int) -> Tensor:
        """(R, rows/R, …): the R equal blocks of `rows` as one tensor (a view where it can be)."""
        return rows.reshape(runs, rows.shape[0] // runs, *rows.shape[1:])

    def view(self, run: int) -> AttackView:
        """Run `run`'s AttackView: its blocks of the stacked rows, its own generator keys."""
        honest, shadow, bases = self.honest, self.shadow, self.bases
        if self.runs > 1:
            honest, shadow, bases = (
                self.stacked(rows, self.runs)[run] for rows in (honest, shadow, bases)
            )
        return AttackView(
            honest=honest,
            shadow=shadow,
            bases=bases,
            n=self.n,
            f=self.f,
            generator=None,  # seeded on first use (AttackView.generator_keys)
            generator_keys=(self.seeds[run], "attack", self.round),
            gain=self.gain,
            aggregate=self.aggregate,
        )


class Attack(ABC):
    """Chooses the (m, d) target candidates of the m Byzantine members."""

    name: ClassVar[str]
    #: The honest shadow estimator runs on labels y → (C − 1) − y (label flipping).
    flips_labels: ClassVar[bool] = False
    #: The attack needs honest statistics (omniscient or pooled shadow ones).
    uses_honest: ClassVar[bool] = False
    #: The attack evaluates the run's aggregator (`AttackView.aggregate`): its cohort needs it.
    uses_aggregator: ClassVar[bool] = False
    #: The attack reads its members' own shadow candidates (`AttackView.shadow`), whatever its
    #: knowledge: the cohort must run the shadow estimator even when it is omniscient.
    uses_shadow: ClassVar[bool] = False

    @abstractmethod
    def targets(self, view: AttackView) -> Tensor:
        """(m, d) target candidates."""

    def targets_runs(self, runs: RunsView) -> Tensor:
        """The targets of every run's cohort, run after run ((R·m, d)), bitwise each run's own
        (`targets` of `runs.view(r)`). The default asks run by run; attacks whose targets are
        statistics of the honest rows compute all runs' at once."""
        if runs.runs == 1:
            return self.targets(runs.view(0))
        return torch.cat([self.targets(runs.view(r)) for r in range(runs.runs)])
