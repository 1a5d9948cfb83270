"""One place that imports every registering module, so listings and config validation see all
components by name. It lives at the composition root because attacks (byzps.worker) sit above
byzps.common, where the config is defined."""

from __future__ import annotations

from byzps.common.config import ConfigError, RunConfig
from byzps.common.registry import Registry


def registries() -> dict[str, Registry]:
    """Every component registry by kind, in a stable order."""
    from byzps.common.aggregators import AGGREGATORS
    from byzps.common.compressors import COMPRESSORS
    from byzps.common.estimators import ESTIMATORS
    from byzps.common.tasks import TASKS
    from byzps.worker.byzantine import ATTACKS

    return {
        "algorithms": ESTIMATORS,
        "compressors": COMPRESSORS,
        "aggregators": AGGREGATORS,
        "attacks": ATTACKS,
        "tasks": TASKS,
    }


def catalog() -> dict[str, list[str]]:
    """Registered names by kind."""
    return {kind: registry.names() for kind, registry in registries().items()}


def check_components(config: RunConfig) -> None:
    """Every named component exists and accepts its params; a ConfigError names the key."""
    found = registries()
    checks = (
        ("algorithm", found["algorithms"], config.algorithm.name, config.algorithm.params),
        ("compressor", found["compressors"], config.compressor.name, {}),
        ("aggregator", found["aggregators"], config.aggregator.name, config.aggregator.params),
        ("attack", found["attacks"], config.attack.name, config.attack.params),
        ("task", found["tasks"], config.task.name, {}),
    )
    for key, registry, name, params in checks:
        try:
            registry.get(name)
        except ValueError as exc:
            raise ConfigError(f"{key}.name: {exc}") from None
        try:
            registry.check(name, params)
        except ValueError as exc:
            raise ConfigError(f"{key}.params: {exc}") from None
    for i, wrapper in enumerate(config.aggregator.pre):
        try:
            found["aggregators"].get(wrapper)
        except ValueError as exc:
            raise ConfigError(f"aggregator.pre[{i}]: {exc}") from None
