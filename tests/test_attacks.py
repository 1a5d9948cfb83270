"""Attack targets: the formulas of ALGORITHMS.md, checked against direct computations."""

from __future__ import annotations

import pytest
import torch

from byzps.common.attacks import ATTACKS, AttackView, build_attack
from byzps.common.attacks.strategies import alie_z

D = 50


def make_view(h: int = 12, m: int = 8, seed: int = 0) -> AttackView:
    gen = torch.Generator().manual_seed(seed)
    honest = torch.randn(h, D, generator=gen, dtype=torch.float64) + 3.0
    shadow = torch.randn(m, D, generator=gen, dtype=torch.float64)
    bases = torch.randn(m, D, generator=gen, dtype=torch.float64)
    return AttackView(
        honest, shadow, bases, n=h + m, f=m, generator=torch.Generator().manual_seed(7)
    )


def test_alie_z_for_paper_setting() -> None:
    assert alie_z(20, 8) == pytest.approx(0.6745, abs=1e-3)


def test_alie_target_is_mean_minus_z_std() -> None:
    view = make_view()
    target = build_attack("alie").targets(view)
    expected = view.honest.mean(0) - alie_z(20, 8) * view.honest.std(0)
    assert target.shape == (8, D)
    torch.testing.assert_close(target, expected.expand(8, -1))


def test_ipm_target() -> None:
    view = make_view()
    target = build_attack("ipm", epsilon=0.5).targets(view)
    torch.testing.assert_close(target, (-0.5 * view.honest.mean(0)).expand(8, -1))


def test_sign_flip_negates_honest_rows() -> None:
    view = make_view()
    target = build_attack("sf").targets(view)
    honest_rows = {tuple(row.tolist()) for row in (-view.honest)}
    assert all(tuple(row.tolist()) in honest_rows for row in target)


def test_bit_flip_and_label_flip_use_own_shadow() -> None:
    view = make_view()
    torch.testing.assert_close(build_attack("bf").targets(view), -view.shadow)
    lf = build_attack("lf")
    assert lf.flips_labels
    torch.testing.assert_close(lf.targets(view), view.shadow)


def test_gauss_has_requested_scale_and_is_seeded() -> None:
    view = make_view(m=8)
    wide = AttackView(
        view.honest,
        view.shadow,
        torch.zeros(8, 20000, dtype=torch.float64),
        n=20,
        f=8,
        generator=torch.Generator().manual_seed(3),
    )
    target = build_attack("gauss", sigma=0.5).targets(wide)
    assert float(target.std()) == pytest.approx(0.5, rel=0.02)
    again = AttackView(
        wide.honest, wide.shadow, wide.bases, n=20, f=8, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(build_attack("gauss", sigma=0.5).targets(again), target)


def test_mimic_copies_one_honest_worker() -> None:
    view = make_view()
    torch.testing.assert_close(
        build_attack("mimic", target=3).targets(view), view.honest[3].expand(8, -1)
    )


def test_minmax_is_the_largest_feasible_deviation() -> None:
    view = make_view()
    target = build_attack("minmax").targets(view)[0]
    honest = view.honest
    mu, sigma = honest.mean(0), honest.std(0)
    max_pairwise = torch.cdist(honest, honest).max()
    # Feasible: no honest row is farther from the target than the honest diameter ...
    assert float(torch.cdist(target[None], honest).max()) <= float(max_pairwise) * (1 + 1e-9)
    # ... tight: a slightly larger step along −σ breaks the constraint ...
    gamma = float((mu - target).norm() / sigma.norm())
    assert gamma > 0
    beyond = mu - 1.001 * gamma * sigma
    assert float(torch.cdist(beyond[None], honest).max()) > float(max_pairwise)
    # ... and the deviation is along −σ.
    torch.testing.assert_close(target, mu - gamma * sigma)


def test_no_attack_has_no_targets() -> None:
    with pytest.raises(RuntimeError):
        build_attack("na").targets(make_view())


def test_registry_names_and_bad_params() -> None:
    assert set(ATTACKS.names()) == {
        "na",
        "alie",
        "ipm",
        "sf",
        "lf",
        "bf",
        "gauss",
        "mimic",
        "minmax",
    }
    with pytest.raises(ValueError, match="epsilon2"):
        build_attack("ipm", epsilon2=1.0)
    with pytest.raises(ValueError, match="sigma"):
        build_attack("gauss", sigma=-1.0)
