"""One place that imports every registering module, so listings and config validation see all
components by name."""

from __future__ import annotations


def catalog() -> dict[str, list[str]]:
    """Registered names by kind, in a stable order."""
    from byzps.common.aggregators import AGGREGATORS
    from byzps.common.compressors import COMPRESSORS
    from byzps.common.estimators import ESTIMATORS
    from byzps.common.tasks import TASKS
    from byzps.worker.byzantine import ATTACKS

    return {
        "algorithms": ESTIMATORS.names(),
        "compressors": COMPRESSORS.names(),
        "aggregators": AGGREGATORS.names(),
        "attacks": ATTACKS.names(),
        "tasks": TASKS.names(),
    }
