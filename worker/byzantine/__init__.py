"""Byzantine workers: attack strategies and the colluding cohort that runs them."""

from byzps.worker.byzantine import attacks as _attacks  # noqa: F401  (registers the attacks)
from byzps.worker.byzantine.base import ATTACKS, Attack, AttackView

__all__ = ["ATTACKS", "Attack", "AttackView", "build_attack"]


def build_attack(name: str, **params: object) -> Attack:
    """Build an attack by name (see ATTACKS.names()); unknown parameters are a ValueError."""
    return ATTACKS.build(name, **params)
