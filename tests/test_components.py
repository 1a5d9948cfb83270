"""Components described from their constructors: `byzps components [--verbose | NAME]` and the
errors of the registries, which list the parameters a component does take."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from byzps.cli.main import main
from byzps.common.aggregators import AGGREGATORS, build_aggregator
from byzps.common.attacks import build_attack
from byzps.common.catalog import check_components
from byzps.common.compressors import TopK
from byzps.common.config import ConfigError, RunConfig
from byzps.common.estimators import ESTIMATORS, build_estimator
from byzps.common.registry import Registry


def _names(registry: Registry, name: str) -> list[str]:
    return [p.name for p in registry.parameters(name)]


def test_unknown_parameter_errors_list_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"^attack 'alie' has no parameter 'zz' \(parameters: z\)$"
    ):
        build_attack("alie", zz=1.0)
    with pytest.raises(ValueError, match=r"attack 'sf' has no parameter 'z' \(it takes no param"):
        build_attack("sf", z=1.0)
    with pytest.raises(ValueError, match=r"'gm' has no parameter 'iters' \(parameters: .*nu"):
        build_aggregator("gm", 1, params={"iters": 3})
    with pytest.raises(ValueError, match=r"'byz-dm21' has no parameter 'm' \(parameters: eta, "):
        build_estimator("byz-dm21", 10, TopK(10, k=1), m=0.9)


def test_config_errors_carry_the_list_too() -> None:
    config = RunConfig.from_dict(
        {
            "cluster": {"workers": 5, "byzantine": 1},
            "compressor": {"k": 1},
            "attack": {"name": "ipm", "params": {"e": 1}},
        }
    )
    with pytest.raises(ConfigError, match=r"^attack: .*'e' \(parameters: epsilon"):
        check_components(config)


def test_parameters_follow_kwargs_up_the_mro_and_hide_supplied_ones() -> None:
    # ByzVRDM21 has no __init__ of its own; DASHA-PAGE's **common reaches BatchedEstimator.
    assert _names(ESTIMATORS, "byz-vr-dm21") == ["eta", "authors_init"]
    assert _names(ESTIMATORS, "byz-dasha-page") == ["a", "p"]
    assert _names(AGGREGATORS, "krum") == ["neighbours"]  # Krum's own __init__ hides m
    (tau, iterations) = AGGREGATORS.parameters("cclip")
    assert (tau.name, tau.default, tau.annotation) == ("tau", 10.0, "float | str")
    assert iterations.describe() == "iterations: int = 3"
    # A supplied argument is still accepted when the builder passes it.
    ESTIMATORS.check("byz-dm21", {"dim": 3, "seed": 1, "eta": 0.5})


def test_summary_is_the_first_paragraph_on_one_line() -> None:
    summary = AGGREGATORS.summary("gm")
    assert summary.startswith("Smoothed Weiszfeld iterations") and "\n" not in summary
    assert summary.endswith(".")  # the docstring's "…at the mean:" introduces a formula


def test_components_lists_names_by_kind() -> None:
    result = CliRunner().invoke(main, ["components"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert set(lines) == {
        "algorithms",
        "compressors",
        "aggregators",
        "wrappers",
        "attacks",
        "tasks",
    }
    assert "byz-dm21" in lines["algorithms"] and "nnm" in lines["wrappers"]


def test_components_verbose_shows_doc_lines_and_defaults() -> None:
    result = CliRunner().invoke(main, ["components", "--verbose"])
    assert result.exit_code == 0, result.output
    out = result.output
    dm21 = out[out.index("  byz-dm21\n") :]
    assert dm21.splitlines()[1].strip().startswith("Byz-DM21 (EF21-SGD2M")
    assert "eta: float = 0.1" in dm21 and "authors_init: bool = False" in dm21
    assert "(no parameters)" in out[out.index("  cm\n") :].splitlines()[2]


def test_components_name_describes_one_component() -> None:
    result = CliRunner().invoke(main, ["components", "alie"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "attack alie",
        "  ALIE: t = μ − z·σ with μ, σ the coordinate-wise mean and std of the honest candidates.",
        "    z: float | None = None",
    ]


def test_components_refuses_unknown_names_and_mixed_options() -> None:
    result = CliRunner().invoke(main, ["components", "alei"])
    assert result.exit_code == 2
    assert "no component 'alei'" in result.output and "alie" in result.output
    result = CliRunner().invoke(main, ["components", "--markdown", "alie"])
    assert result.exit_code == 2


def test_a_registration_writes_the_name_once_and_the_class_carries_it() -> None:
    import ast
    import inspect

    from byzps.common.catalog import registries
    from byzps.common.server_rules import SERVER_RULES
    from byzps.worker.byzantine.protocol import PROTOCOL_ATTACKS

    every = {**registries(), "server rules": SERVER_RULES, "protocol attacks": PROTOCOL_ATTACKS}
    for kind, registry in every.items():
        for name in registry.names():
            cls = registry.get(name)
            assert cls.name == name, (kind, name)
            body = ast.parse(inspect.getsource(cls)).body[0]
            assert isinstance(body, ast.ClassDef)
            assigned = [
                t.id
                for node in body.body
                if isinstance(node, ast.Assign | ast.AnnAssign)
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            ]
            assert "name" not in assigned, f"{kind} {name!r} writes its name again in its body"
    registry: Registry[object] = Registry("thing")

    @registry.register("widget")
    class Widget:
        pass

    assert Widget.name == "widget" and registry.get("widget") is Widget  # type: ignore[attr-defined]
