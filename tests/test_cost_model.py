"""benchmarks/cost_model.py: the model's formulas on known inputs, its memory count against the
tensors a real engine allocates, and the directions every prediction must move in."""

from __future__ import annotations

import pytest
import torch
from bench_support import load_benchmark

from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.server.engine import build_engine

cost_model = load_benchmark("cost_model")
Workload = cost_model.Workload


def units() -> dict:
    """A made-up unit table (round numbers, so the formulas can be checked by hand)."""
    per_element = {"10": 1e-9, "100": 1e-8, "1000": 1e-7}  # slope 1 in log-log
    return {
        "machine": {"nproc": 2},
        "units": {
            "push_s": 1e-3,
            "grpc_call_s": 1e-4,
            "decode_s_per_byte": 1e-10,
            "decode_message_s": 1e-5,
            "serve_call_s": 1e-4,
            "decode_full_s_per_byte": 1e-10,
            "absorb_full_s_per_nnz": 1e-9,
            "absorb_s_per_nnz": 1e-8,
            "step_s_per_coord": 1e-9,
            "compare_s_per_coord": 2e-9,
            "serve_dense_s_per_byte": 1e-10,
            "serve_delta_s_per_byte": 2e-10,
            "decode_dense_s_per_byte": 1e-10,
            "decode_delta_s_per_byte": 1e-10,
            "wal_s_per_byte": 1e-9,
            "rule_s_per_element": {rule: dict(per_element) for rule in cost_model.RULES},
            "rule_temp_coefficients": {rule: [1.0, 0.0] for rule in cost_model.RULES},
            "server_baseline_bytes": 300e6,
            "worker_baseline_bytes": 300e6,
            "worker_bytes_per_coord": 40.0,
            "worker_s_per_coord": 1e-8,
        },
    }


@pytest.fixture
def model():
    return cost_model.Model(units())


def test_interpolation_is_log_linear_and_extrapolates():
    table = {"10": 1.0, "100": 10.0}
    assert cost_model._interpolate(table, 10) == pytest.approx(1.0)
    assert cost_model._interpolate(table, 100) == pytest.approx(10.0)
    assert cost_model._interpolate(table, 1000) == pytest.approx(100.0)
    assert cost_model._interpolate(table, 1) == pytest.approx(0.1)
    assert cost_model._interpolate({"10": 1.0, "100": 10.0, "1000": 10.0}, 500) == pytest.approx(
        10.0
    )


def test_round_parts_by_hand(model):
    w = Workload(n=10, d=1000, k=10, rule="mean", downlink="dense")
    parts = model.server(w)
    up = 8 * 10 + cost_model.MESSAGE_HEADER
    assert parts["push"] == pytest.approx(10 * 1e-3)
    assert parts["decode"] == pytest.approx(10 * (1e-5 + up * 1e-10))
    assert parts["absorb"] == pytest.approx(10 * 10 * 1e-8)
    assert parts["aggregate"] == pytest.approx(10 * 1000 * 1e-9)
    assert parts["compare"] == 0.0  # dense downlink: no comparison of ĝ
    assert parts["step"] == pytest.approx(1000 * 1e-9)
    assert parts["broadcast"] == pytest.approx(10 * (1e-4 + 4000 * 1e-10))
    assert parts["exchange"] == 0.0
    assert parts["wal"] == pytest.approx(10 * up * 1e-9)
    assert parts["round"] == pytest.approx(sum(v for k, v in parts.items() if k != "round"))


def test_memory_matches_a_real_engine(model):
    """The engine's tensors at n = 20, d = 1e4 (states, x, ĝ) are exactly what the model counts."""
    n, d = 20, 10_000
    config = RunConfig.from_dict(
        {
            "run": {"seed": 0, "rounds": 5},
            "task": {"name": "quadratic", "params": {"dim": d}},
            "cluster": {"workers": n, "byzantine": 4},
            "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
            "compressor": {"name": "topk", "ratio": 0.01},
            "aggregator": {"name": "cm"},
        }
    )
    engine = build_engine(config, build_run_task(config))

    def held() -> int:
        tensors = [getattr(engine.rule, name) for name in engine.rule._tensors]
        tensors += [engine.x, engine.last_aggregate]
        return sum(t.numel() * t.element_size() for t in tensors)

    real = held()
    assert len(engine.rule._tensors) == 1  # Byz-DM21's "state" rule: one (n, d) tensor
    assert model.engine_bytes(n, d, states=1) == real
    w = Workload(n=n, d=d, k=100, rule="cm")
    memory = model.memory(w)
    assert memory["states"] + memory["x, ĝ"] == real
    assert memory["checkpoint snapshot"] == real  # a background checkpoint clones them all
    # A round of the engine leaves the count unchanged (no tensor it keeps grows).
    engine.close_round()
    assert held() == real


def test_two_shards_halve_the_state(model):
    one = Workload(n=1000, d=10**9, k=10**7, rule="cm", shards=1)
    two = Workload(n=1000, d=10**9, k=10**7, rule="cm", shards=2)
    assert model.memory(two)["states"] == pytest.approx(model.memory(one)["states"] / 2)
    assert model.server(two)["aggregate"] == pytest.approx(model.server(one)["aggregate"] / 2)
    # Coordinate-wise rules exchange nothing; Gram rules the (n+1)² float64 Gram, whatever d.
    assert model.exchange_s(two) == 0.0
    krum = Workload(n=1000, d=10**9, k=10**7, rule="krum", shards=2)
    assert model.exchange_s(krum) > 0
    assert model.exchange_bytes(krum) == pytest.approx(8 * 1001**2)
    more = Workload(n=1000, d=10**6, k=10**4, rule="krum", shards=2)
    assert model.exchange_bytes(more) == model.exchange_bytes(krum)


@pytest.mark.parametrize("rule", ["mean", "cm", "krum", "gm", "nnm+cm"])
def test_predictions_grow_with_n_and_d(model, rule):
    for shards in (1, 4):
        base = Workload(n=50, d=10**6, k=10**4, rule=rule, shards=shards)
        bigger_n = Workload(n=100, d=10**6, k=10**4, rule=rule, shards=shards)
        bigger_d = Workload(n=50, d=10**7, k=10**5, rule=rule, shards=shards)
        for other in (bigger_n, bigger_d):
            assert model.server(other)["round"] > model.server(base)["round"]
            assert model.memory(other)["total"] > model.memory(base)["total"]


def test_shards_for_fits_the_machine(model):
    w = Workload(n=1000, d=10**9, k=10**7, rule="cm")
    machine = 128e9
    shards = model.shards_for(w, machine)
    fits = Workload(**{**w.__dict__, "shards": shards})
    assert model.memory(fits)["total"] <= 0.8 * machine
    assert shards >= 4 * 1000 * 10**9 / machine  # the states alone need this many


def test_recorded_checks_are_predictable(model):
    """Every recorded row has a workload the model can predict, with a positive value."""
    for rec in cost_model.RECORDED:
        assert cost_model.predicted(model, rec) > 0, rec.label
        assert rec.source.startswith("docs/")


def test_measured_units_file_loads():
    """The committed unit costs hold every key the model reads."""
    path = cost_model.DEFAULT_UNITS
    if not path.exists():
        pytest.skip(f"{path} not measured yet (python benchmarks/cost_model.py measure)")
    measured = cost_model.Model.load(path)
    needed = set(units()["units"])
    assert needed <= set(measured.u), needed - set(measured.u)
    assert set(measured.u["rule_s_per_element"]) == set(cost_model.RULES)
    w = Workload(n=1000, d=10**9, k=10**7, rule="cm", shards=64)
    assert measured.server(w)["round"] > 0
    assert torch.tensor(0).numel() == 1  # torch imported alongside: the module needs no GPU
