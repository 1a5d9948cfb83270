"""Byzantine workers: attack strategies and the colluding cohort that runs them."""

from byzps.common.attacks import optimal as _optimal  # noqa: F401  (registers alie-opt, ipm-opt)
from byzps.common.attacks import strategies as _strategies  # noqa: F401  (registers the attacks)
from byzps.common.attacks.base import ATTACKS, Attack, AttackView, RunsView

__all__ = ["ATTACKS", "Attack", "AttackView", "RunsView", "build_attack"]


def build_attack(name: str, **params: object) -> Attack:
    """Build an attack by name (see ATTACKS.names()); unknown parameters are a ValueError."""
    return ATTACKS.build(name, **params)
