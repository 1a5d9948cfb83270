"""Per-worker suspicion scores: the rule's verdict, the discount it gives each worker, the
exponentially weighted score, and where the scores are shown (records, Status, /metrics, report).

The discount is defined once (common/aggregators/verdict.py): δ_i = 1 − min(1, n·w_i), w_i the
input's effective weight in the output. The tests check it against what each rule is known to do
(krum selects one row, cclip clips by a known factor, cm keeps a known band), against a plain
per-column reference for the band rules, and that no input a Byzantine worker can send makes a
score non-finite or outside [0, 1].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from server_support import SECRET, Client, N, in_process, random_update, tiny_config

from byzps.common.aggregators import build_aggregator
from byzps.common.aggregators.verdict import Banded, Weighted
from byzps.common.config import ConfigError, RunConfig
from byzps.common.credentials import OPERATOR, token_for
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.suspicion import SuspicionScores
from byzps.sim.suspicion_report import auc_text, roc_auc

RULES = [
    ("mean", [], {}),
    ("cm", [], {}),
    ("cwtm", [], {}),
    ("meamed", [], {}),
    ("krum", [], {}),
    ("multikrum", [], {}),
    ("gm", [], {}),
    ("cclip", [], {}),
    ("cge", [], {}),
    ("mda", [], {}),
    ("caf", [], {}),
    ("dnc", [], {}),
    ("monna", [], {}),
    ("smea", [], {}),
    ("cm", ["nnm"], {}),
    ("krum", ["nnm"], {}),
    ("gm", ["nnm"], {}),
    ("cclip", ["nnm"], {}),
    ("cm", ["bucketing"], {}),
    ("mean", ["clip"], {"c": 3.0}),
    ("cm", ["arc"], {}),
    ("krum", ["clip", "nnm"], {"c": 3.0}),
]


def shifted(n: int = 20, f: int = 4, d: int = 200, shift: float = 5.0, seed: int = 0):
    """n Gaussian rows, the first f moved by `shift` in every coordinate (an obvious attack)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:f] += shift
    return x


def discount_of(name: str, pre: list[str], params: dict, x: torch.Tensor, f: int) -> np.ndarray:
    aggregator = build_aggregator(name, f, pre=pre, params=params, n=x.shape[0])
    aggregator(x)
    assert aggregator.last_verdict is not None, f"{pre}∘{name} recorded no verdict"
    return aggregator.last_verdict.discount(x, None)


@pytest.mark.parametrize(("name", "pre", "params"), RULES)
def test_every_rule_discounts_an_obvious_attack_more_than_the_honest(
    name: str, pre: list[str], params: dict
) -> None:
    f = 4
    x = shifted(f=f)
    delta = discount_of(name, pre, params, x, f)
    assert delta.shape == (20,) and np.all((delta >= 0) & (delta <= 1))
    if name == "mean" and not pre:
        assert np.all(delta == 0)  # the mean treats everyone alike
    else:
        assert delta[:f].min() > delta[f:].mean(), (delta[:f], delta[f:])


def test_krum_discounts_every_row_but_the_one_it_selects() -> None:
    x = shifted()
    aggregator = build_aggregator("krum", 4, n=20)
    out = aggregator(x)
    delta = aggregator.last_verdict.discount(x, None)
    chosen = int(np.flatnonzero(delta == 0)[0])
    assert np.count_nonzero(delta == 0) == 1 and np.all(delta[delta != 0] == 1)
    assert torch.equal(out, x[chosen])


def test_cclip_discount_is_how_much_it_clipped() -> None:
    """One iteration from the origin: output = Σ min(1, τ/‖x_i‖) x_i / n, so δ_i = 1 − min(1,
    τ/‖x_i‖)."""
    x = shifted(d=50)
    tau = 6.0
    aggregator = build_aggregator("cclip", 4, params={"tau": tau, "iterations": 1}, n=20)
    aggregator(x)
    norms = x.double().norm(dim=1).numpy()
    expected = 1 - np.minimum(1, tau / norms)
    np.testing.assert_allclose(aggregator.last_verdict.discount(x, None), expected, atol=1e-9)


def test_clip_discount_is_one_minus_the_scale() -> None:
    x = shifted(d=50)
    delta = discount_of("mean", ["clip"], {"c": 3.0}, x, 4)
    norms = x.double().norm(dim=1).numpy()
    np.testing.assert_allclose(delta, 1 - np.minimum(1, 3.0 / norms), atol=1e-6)


def band_reference(x: np.ndarray, mix: np.ndarray | None, a: int, b: int, slide: int) -> np.ndarray:
    """Column by column in plain Python: the rows in the band, their weight on each raw input."""
    n0, d = x.shape
    total = np.zeros(n0)
    for t in range(d):
        column = x[:, t]
        if mix is None:
            values = column.copy()
        else:  # zero weights skipped, as band_mean mixes: 0 · inf would be NaN
            pairs = [zip(row, column, strict=True) for row in mix]
            sums = [sum(float(w) * float(v) for w, v in p if w != 0) for p in pairs]
            values = np.array(sums, dtype=x.dtype)
        values = np.where(np.isnan(values), np.inf, values)
        order = sorted(range(len(values)), key=lambda j: values[j])  # stable
        v = values[order].astype(np.float64)
        median = (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
        with np.errstate(invalid="ignore"):  # inf − inf at an infinite median: NaN, never <
            shift = sum(v[b + j] - median < median - v[a + j] for j in range(slide))
        rows = np.eye(n0) if mix is None else mix
        band = v[a + shift : b + shift]
        # a tie group's members share the band slots its value holds
        parts = [float((band == values[j]).sum()) / (v == values[j]).sum() for j in range(len(v))]
        weights = sum(p * rows[j] for j, p in enumerate(parts)) / (b - a)
        total += 1 - np.clip(n0 * weights, 0, 1)
    return total / d


@pytest.mark.parametrize(
    ("a", "b", "slide", "mixed"),
    [(9, 11, 0, False), (4, 16, 0, False), (0, 16, 4, False), (0, 4, 8, False),
     (9, 11, 0, True), (0, 16, 4, True)],
)  # fmt: skip
def test_band_discount_matches_a_column_by_column_reference(
    a: int, b: int, slide: int, mixed: bool
) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(20, 64)).astype(np.float32)  # many ties
    x[2, 5] = np.nan
    x[7, 9] = np.inf
    mix = None
    if mixed:
        mix = np.zeros((20, 20))
        for i in range(20):
            mix[i, rng.choice(20, 12, replace=False)] = 1 / 12
    got = Banded(mix, a, b, slide).discount(torch.from_numpy(x), None)
    np.testing.assert_allclose(got, band_reference(x, mix, a, b, slide), atol=1e-12)


@pytest.mark.parametrize("mixed", [False, True])
def test_a_band_discount_follows_the_rows_not_their_order(mixed: bool) -> None:
    """Ties share the band's slots, so a worker's discount depends on what it sent, not on its
    id: permuting the rows permutes the discounts. Before, tied values entered the band in row
    order, and with sparse candidates (most columns tied at 0) the scores followed the ids."""
    rng = np.random.default_rng(4)
    x = np.zeros((11, 200), np.float32)
    x[:, :20] = rng.integers(-2, 3, size=(11, 20))  # sparse candidates: ties everywhere
    mix = None
    if mixed:
        mix = np.zeros((11, 11))  # weights of 1/4 on integers: sums exact in any order
        for i in range(11):
            mix[i, rng.choice(11, 4, replace=False)] = 1 / 4
    perm = rng.permutation(11)
    permuted_mix = None if mix is None else mix[np.ix_(perm, perm)]
    verdict, permuted = Banded(mix, 4, 7), Banded(permuted_mix, 4, 7)
    want = verdict.discount(torch.from_numpy(x), None)
    got = permuted.discount(torch.from_numpy(x[perm]), None)
    np.testing.assert_allclose(got, want[perm], atol=1e-12)
    if mix is None:  # all tied: the band is everyone's alike
        flat = verdict.discount(torch.zeros(11, 50), None)
        np.testing.assert_allclose(flat, np.zeros(11), atol=1e-12)


def test_the_band_is_scored_on_the_sampled_columns_only() -> None:
    x = shifted(d=300)
    verdict = Banded(None, 9, 11)
    columns = np.arange(0, 300, 7)
    np.testing.assert_allclose(
        verdict.discount(x, columns), verdict.discount(x[:, columns].contiguous(), None)
    )


@pytest.mark.parametrize(
    "poison",
    [math.inf, -math.inf, math.nan, 3e38, -3e38],
    ids=["inf", "-inf", "nan", "max", "-max"],
)
@pytest.mark.parametrize(("name", "pre", "params"), RULES)
def test_no_value_a_byzantine_row_holds_makes_a_discount_leave_0_1(
    name: str, pre: list[str], params: dict, poison: float
) -> None:
    """f rows of ±inf, NaN or ±FLT_MAX: the discounts stay finite in [0, 1], and a non-finite
    row (which every rule ignores) is discounted fully."""
    f = 4
    x = shifted(f=f, d=40)
    x[:f, ::3] = poison
    delta = discount_of(name, pre, params, x, f)
    assert np.all(np.isfinite(delta)) and np.all((delta >= 0) & (delta <= 1)), delta
    if not math.isfinite(poison) and name != "mean":  # the mean is not robust: weight 1/n
        if name in ("cm", "cwtm", "meamed") or "bucketing" in pre:
            assert delta[:f].min() >= delta[f:].max() - 1e-12
        else:
            np.testing.assert_array_equal(delta[:f], 1.0)


def test_a_wrapper_that_computes_its_rows_passes_the_verdict_back_to_the_raw_inputs() -> None:
    """+1e38 and −1e38 in one bucket cancel, so Rows computes the buckets instead of mixing
    lazily; the verdict must still be over the 20 raw inputs."""
    x = shifted(d=30)
    x[0] = 1e38
    x[1] = -1e38
    aggregator = build_aggregator("krum", 4, pre=["bucketing"], params={"bucket_size": 1}, n=20)
    aggregator(x)
    delta = aggregator.last_verdict.discount(x, None)
    assert delta.shape == (20,) and delta[0] == 1 and delta[1] == 1


def test_weighted_verdicts_compose_through_a_mix() -> None:
    mix = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    verdict = Weighted(np.array([1.0, 0.0])).through(mix)
    np.testing.assert_allclose(verdict.weights, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(verdict.discount(torch.zeros(3, 2), None), [0.0, 0.0, 1.0])


def test_the_score_is_a_bias_corrected_exponential_mean_with_the_given_halflife() -> None:
    scores = SuspicionScores(3, halflife=2.0, columns=10)
    verdicts = [Weighted(np.array([1.0, 0.0, 0.0])), Weighted(np.array([0.0, 0.5, 0.5]))]
    x = torch.zeros(3, 4)
    history = []
    for t in range(6):
        verdict = verdicts[t % 2]
        scores.observe(verdict, x, t)
        history.append(verdict.discount(x, None))
    beta = 0.5 ** (1 / 2.0)
    weights = beta ** np.arange(5, -1, -1)
    expected = (weights[:, None] * np.array(history)).sum(0) / weights.sum()
    np.testing.assert_allclose(scores.scores, expected)
    assert scores.report() == [round(float(v), 6) for v in expected]


def test_scores_resume_exactly_from_their_state() -> None:
    x = shifted(d=5000)
    aggregator = build_aggregator("cm", 4, pre=["nnm"], n=20)
    aggregator(x)
    one = SuspicionScores(20, halflife=10, columns=256, seed=7)
    for t in range(5):
        one.observe(aggregator.last_verdict, x, t)
    two = SuspicionScores(20, halflife=10, columns=256, seed=7)
    two.load_state_dict(one.state_dict())
    for t in range(5, 9):
        one.observe(aggregator.last_verdict, x, t)
        two.observe(aggregator.last_verdict, x, t)
    np.testing.assert_array_equal(one.scores, two.scores)


def test_sampled_columns_depend_on_seed_and_round_only() -> None:
    scores = SuspicionScores(3, halflife=1, columns=100, seed=5)
    assert scores.sample(50, 0) is None
    first = scores.sample(10**6, 3)
    assert np.array_equal(first, SuspicionScores(3, 1, 100, seed=5).sample(10**6, 3))
    assert not np.array_equal(first, scores.sample(10**6, 4))
    assert 95 <= first.size <= 100 and np.all(np.diff(first) > 0)


def test_halflife_zero_turns_the_scores_off() -> None:
    scores = SuspicionScores(3, halflife=0, columns=1)
    scores.observe(Weighted(np.array([1.0, 0.0, 0.0])), torch.zeros(3, 2), 0)
    assert scores.report() is None and np.all(scores.scores == 0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("suspicion_halflife", -1.0, "aggregator.suspicion_halflife"),
        ("suspicion_halflife", math.inf, "aggregator.suspicion_halflife"),
        ("suspicion_columns", 0, "aggregator.suspicion_columns"),
    ],
)
def test_bad_suspicion_settings_are_refused_naming_the_key(
    key: str, value: float, message: str
) -> None:
    data = tiny_config().to_dict()
    data["aggregator"][key] = value
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(data)


def test_roc_auc_counts_ties_as_half() -> None:
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5


def test_status_gives_the_scores_to_the_operator_only() -> None:
    """A worker must not read its own score (it could search for the largest attack that keeps
    it low); the operator's credential reads every worker's."""
    config = tiny_config()
    with in_process(config, quorum=N) as srv:
        client = Client(srv.address)
        gen = torch.Generator().manual_seed(0)
        for w in range(N):
            client.register(str(w))
        for r in range(3):
            for w in range(N):
                client.push(str(w), r, r + 1, random_update(gen))
        assert srv.coordinator.round == 3
        as_worker = client.status(as_worker="0")
        assert len(as_worker.workers) == N and not as_worker.suspicion
        operator = client.stub.Status(
            pb.StatusRequest(), metadata=client.meta("", token=token_for(SECRET, OPERATOR))
        )
        scores = srv.coordinator.engine.suspicion.scores
        assert list(operator.suspicion) == pytest.approx(list(scores), abs=1e-6)
        assert len(operator.suspicion) == N and all(0 <= s <= 1 for s in operator.suspicion)
        client.close()


def test_a_simulated_sign_flip_is_told_apart_and_recorded(tmp_path: Path) -> None:
    """a9a, n = 20, f = 8, nnm∘cm, sign flip: the final scores put every Byzantine id above every
    honest one, and metrics.jsonl and summary.json carry them."""
    from click.testing import CliRunner
    from configs import write_config

    from byzps.cli.main import main

    config = write_config(tmp_path / "run.toml", rounds=150, eval_every=50, workers=20,
                          byzantine=8, lr=0.05, attack="sf")  # fmt: skip
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["suspicion"]) == 20 for r in records)
    final = json.loads((out / "summary.json").read_text())["final"]["suspicion"]
    assert roc_auc(final, [w >= 12 for w in range(20)]) == 1.0


def test_the_engine_checkpoints_the_scores_and_reads_checkpoints_without_them() -> None:
    """A restored engine continues the scores exactly; a checkpoint from before the scores
    existed restores everything else and starts them afresh."""
    from byzps.sim.build import build_simulation

    config = tiny_config(rounds=12)
    one = build_simulation(config)
    for _ in range(6):
        one.step()
    saved = one.engine.state_dict()
    assert saved["suspicion"]["total"] > 0
    two = build_simulation(config)
    two.engine.load_state_dict(saved)
    np.testing.assert_array_equal(two.engine.suspicion.scores, one.engine.suspicion.scores)
    old = {k: v for k, v in saved.items() if k != "suspicion"}
    three = build_simulation(config)
    three.engine.load_state_dict(old)
    assert three.engine.round == 6 and np.all(three.engine.suspicion.scores == 0)


def test_the_auc_column_is_the_mean_with_its_95_percent_t_interval() -> None:
    """Three seeds 0.6, 0.7, 0.8: mean 0.7, half-width t(2) · s/√3 = 4.303 · 0.1/√3 ≈ 0.25 (not
    the population std 0.082 the column used to print); one seed shows its value alone."""
    assert auc_text([0.6, 0.7, 0.8]) == "0.700 ± 0.25"
    assert auc_text([1.0, 1.0, 1.0]) == "1.000 ± 0"
    assert auc_text([0.5]) == "0.500"
