"""Bit allocation: the integer program finds known optima, greedy is the weaker baseline."""

from __future__ import annotations

import itertools

import pytest

from qcli.methods.bit_allocation import (
    Budget,
    InfeasibleBudget,
    Unit,
    bops_total,
    degradation,
    solve_greedy,
    solve_ip,
    weight_bytes,
)


def _trap() -> list[Unit]:
    """Greedy's ratio trap: B's cheap steps look best per bit, but cannot save enough alone,
    so greedy pays for them and then for A too; the optimum takes A's step only."""
    return [
        Unit("A", "weight", (8, 4), (0.0, 4.0), params=100),
        Unit("B", "weight", (8, 4, 2), (0.0, 0.2, 0.3), params=10),
    ]


def _brute_force(units, budget_bits):
    best = None
    for combo in itertools.product(*(u.bits for u in units)):
        bits = dict(zip((u.name for u in units), combo, strict=True))
        if weight_bytes(units, bits) * 8 <= budget_bits:
            d = degradation(units, bits)
            if best is None or d < best[0]:
                best = (d, bits)
    return best


def test_ip_finds_the_known_optimum_where_greedy_does_not():
    units = _trap()
    budget = Budget("size", (100 * 8 + 10 * 8 - 400) / 8)  # save 400 bits
    ip = solve_ip(units, budget)
    greedy = solve_greedy(units, budget)
    assert ip.bits == {"A": 4, "B": 8} and ip.status == "optimal"
    assert ip.predicted_deg == pytest.approx(4.0)
    assert greedy.predicted_deg == pytest.approx(4.3) and greedy.bits["B"] == 2
    assert ip.size_bytes <= budget.value and greedy.size_bytes <= budget.value


def test_ip_matches_brute_force_on_random_problems():
    import random

    rng = random.Random(0)
    for _ in range(20):
        units = []
        for i in range(5):
            degs = sorted((rng.random() * 3 for _ in range(3)), reverse=True)
            units.append(
                Unit(f"l{i}", "weight", (2, 4, 8), (*degs[:2], 0.0), params=rng.randint(1, 50))
            )
        full = sum(u.params * 8 for u in units)
        budget_bits = rng.randint(sum(u.params * 2 for u in units), full)
        ip = solve_ip(units, Budget("size", budget_bits / 8))
        best, _ = _brute_force(units, budget_bits)
        assert ip.predicted_deg == pytest.approx(best, rel=1e-5, abs=1e-5)
        assert solve_greedy(units, Budget("size", budget_bits / 8)).predicted_deg >= best - 1e-9


def test_bops_budget_couples_weight_and_input_widths():
    units = [
        Unit("act", "act", (4, 8), (1.0, 0.0)),
        Unit("conv", "weight", (4, 8), (1.5, 0.0), params=10, macs=100, input_unit="act"),
    ]
    # 8x8 = 6400 bops; 4x8 either way = 3200; the cheaper degradation is the activation's
    ip = solve_ip(units, Budget("bops", 3200))
    assert ip.bits == {"act": 4, "conv": 8} and ip.bops == bops_total(units, ip.bits) == 3200
    assert solve_greedy(units, Budget("bops", 3200)).bops <= 3200


def test_drop_budget_minimizes_size():
    units = [
        Unit("a", "weight", (4, 8), (1.0, 0.0), drop=(0.5, 0.0), params=100),
        Unit("b", "weight", (4, 8), (1.0, 0.0), drop=(0.8, 0.0), params=10),
    ]
    ip = solve_ip(units, Budget("drop", 0.6))
    assert ip.bits == {"a": 4, "b": 8} and ip.predicted_drop <= 0.6


def test_infeasible_budget_states_the_smallest_reachable_size():
    units = _trap()
    with pytest.raises(InfeasibleBudget, match=r"smallest reachable size is 52\.5 bytes") as e:
        solve_ip(units, Budget("size", 40))
    assert e.value.reachable == 52.5 and e.value.exit_code == 1
    with pytest.raises(InfeasibleBudget):
        solve_greedy(units, Budget("size", 40))
