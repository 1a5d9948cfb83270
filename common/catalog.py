"""One place that imports every registering module, so listings and config validation see all
components by name (imported lazily: the config module stays free of torch)."""

from __future__ import annotations

from byzps.common.config import ConfigError, RunConfig
from byzps.common.registry import Registry


def registries() -> dict[str, Registry]:
    """Every component registry by kind, in a stable order."""
    from byzps.common.aggregators import AGGREGATORS, WRAPPERS
    from byzps.common.attacks import ATTACKS
    from byzps.common.compressors import COMPRESSORS
    from byzps.common.estimators import ESTIMATORS
    from byzps.common.tasks import TASKS

    return {
        "algorithms": ESTIMATORS,
        "compressors": COMPRESSORS,
        "aggregators": AGGREGATORS,
        "wrappers": WRAPPERS,
        "attacks": ATTACKS,
        "tasks": TASKS,
    }


def catalog() -> dict[str, list[str]]:
    """Registered names by kind."""
    return {kind: registry.names() for kind, registry in registries().items()}


def check_components(config: RunConfig) -> None:
    """Every named component exists and accepts its params; a ConfigError names the key.

    Aggregators and attacks are cheap to build, so they are built (which checks every parameter);
    algorithm and task parameters need the task's dimension and are checked when the run is built.
    """
    from byzps.common.aggregators import build_aggregator
    from byzps.common.attacks import build_attack

    found = registries()
    for key, name in (
        ("algorithm", config.algorithm.name),
        ("compressor", config.compressor.name),
        ("task", config.task.name),
    ):
        try:
            found[f"{key}s"].get(name)
        except ValueError as exc:
            raise ConfigError(f"{key}.name: {exc}") from None
    try:
        found["tasks"].check(config.task.name, config.task.params)
    except ValueError as exc:
        raise ConfigError(f"task.params: {exc}") from None
    try:
        found["compressors"].check(config.compressor.name, config.compressor.params)
    except ValueError as exc:
        raise ConfigError(f"compressor.params: {exc}") from None
    agg = config.aggregator
    try:
        build_aggregator(
            agg.name,
            config.cluster.byzantine,
            pre=agg.pre,
            params=agg.params,
            n=config.cluster.workers,
        )
    except ValueError as exc:
        raise ConfigError(f"aggregator: {exc}") from None
    try:
        build_attack(config.attack.name, **config.attack.params)
    except ValueError as exc:
        raise ConfigError(f"attack: {exc}") from None
