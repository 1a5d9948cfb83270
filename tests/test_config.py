"""Run configuration: typed loading, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from configs import small_config, to_toml

from byzps.common.config import ConfigError, RunConfig

GOOD = to_toml(
    small_config(seed=3, rounds=50, eval_every=None, workers=20, byzantine=8, lr=0.05, eta=0.01)
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_loads_typed_values(tmp_path: Path) -> None:
    config = RunConfig.load(write(tmp_path, GOOD))
    assert config.run.seed == 3
    assert config.cluster.byzantine == 8
    assert config.aggregator.pre == ["nnm"]
    assert config.honest_workers == 12
    assert isinstance(config.algorithm.lr, float)


def test_int_accepted_for_float(tmp_path: Path) -> None:
    config = RunConfig.load(write(tmp_path, GOOD), ["algorithm.lr=1"])
    assert config.algorithm.lr == 1.0 and isinstance(config.algorithm.lr, float)


def test_overrides_parse_toml_values(tmp_path: Path) -> None:
    config = RunConfig.load(
        write(tmp_path, GOOD),
        ["algorithm.lr=0.5", "aggregator.pre=[]", "attack.name=ipm", "attack.params.epsilon=0.2"],
    )
    assert config.algorithm.lr == 0.5
    assert config.aggregator.pre == []
    assert config.attack.name == "ipm"
    assert config.attack.params == {"epsilon": 0.2}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("compressor.ratoi=0.1", "compressor.ratoi"),
        ('task.batch_size="one"', "task.batch_size"),
        ("cluster.byzantine=10", "cluster.byzantine"),
        ("algorithm.eta=1.5", "algorithm.eta"),
        ("compressor.ratio=0.5", "compressor.k"),
        ('task.split="weird"', "task.split"),
        ('task.sampling="without"', "task.sampling"),
        ('task.split_over="byzantine"', "task.split_over"),
        ("run.rounds=0", "run.rounds"),
        ("nosection.key=1", "nosection"),
        ('attack.knowledge="psychic"', "attack.knowledge"),
        ('aggregator.pre="nnm"', "aggregator.pre"),
        ("run.seed=true", "run.seed"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}"):
        RunConfig.load(write(tmp_path, GOOD), [override])


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        RunConfig.load(write(tmp_path, GOOD), ["lr"])


def test_digest_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = RunConfig.load(write(tmp_path, GOOD))
    b = RunConfig.load(write(tmp_path, GOOD))
    c = RunConfig.load(write(tmp_path, GOOD), ["algorithm.lr=0.5"])
    assert a.digest() == b.digest() != c.digest()


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.load(write(tmp_path, "[run\n"))
