"""Mixed-precision bit allocation: pick one width per quantizer under a budget.

The integer program of AdaQuant's mixed-precision pipeline (Hubara et al., ICML'21), solved
with OR-Tools CP-SAT, plus a greedy allocation over the same numbers as the baseline. Pure:
numbers in, a choice out; measuring the numbers is `methods.sensitivity`.

The problem: weight units (a conv/linear layer: its weight bits) and activation units (an
activation quantizer: its bits). Each candidate width of a unit has a measured degradation
(the model with only that quantizer at that width, against the float model), assumed additive
across units as in the paper. Costs:
- size: Σ params_l · w_l bits, the packed weight size (an exported file stores exactly those
  integers; `weight_bytes` turns bits into bytes);
- bit-operations: Σ MACs_l · w_l · a_l, with a_l the width of the activation quantizer that
  feeds layer l (32 when its input is float). The product of two choices stays linear in the
  program through one boolean per (layer, weight width, input width), tied to the activation
  unit's own choice.
Budgets: a size or bit-operation ceiling (minimize the summed degradation), or a degradation
ceiling (minimize the size).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qcli.errors import QcliError

BUDGET_KINDS = ("size", "bops", "drop")
SOLVERS = ("ip", "greedy")
# Degradations are floats; CP-SAT needs integers. Each is scaled so the largest one measured
# becomes DEG_RESOLUTION (ties below 1e-6 of the largest are not worth telling apart), and
# floored at 1 where it was positive so no harmful choice becomes free.
DEG_RESOLUTION = 1_000_000
FLOAT_INPUT_BITS = 32


@dataclass(frozen=True)
class Unit:
    """One quantizer to choose a width for. `deg[i]` (and `drop[i]`) belong to `bits[i]`."""

    name: str
    kind: str  # "weight" or "act"
    bits: tuple[int, ...]
    deg: tuple[float, ...]
    drop: tuple[float, ...] = ()  # top-1 drop in percent (a proxy), for degradation budgets
    params: int = 0  # weight units: weights in the layer
    macs: int = 0  # weight units: multiply-adds per image
    input_unit: str | None = None  # weight units: the activation unit feeding the layer

    def __post_init__(self) -> None:
        if not self.bits or len(self.deg) != len(self.bits):
            raise ValueError(f"unit {self.name}: one degradation per candidate width")

    def added_drop(self, b: int) -> float:
        """The drop width `b` adds over the unit's widest candidate, floored at 0 (as the paper
        floors ΔL): even 8 bits move a few near-tied images, which no budget can undo."""
        if not self.drop:
            return 0.0
        widest = self.drop[self.bits.index(max(self.bits))]
        return max(self.drop[self.bits.index(b)] - widest, 0.0)


@dataclass(frozen=True)
class Budget:
    kind: str  # size (bytes), bops (bit-operations), drop (summed added top-1 changes, %)
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS or not (self.value >= 0 and math.isfinite(self.value)):
            raise ValueError(f"bad budget {self.kind}={self.value}")


@dataclass(frozen=True)
class Allocation:
    bits: dict[str, int]  # unit name -> chosen width
    solver: str
    status: str  # optimal / feasible
    objective: float
    predicted_deg: float
    predicted_drop: float
    size_bytes: float
    bops: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "solver": self.solver,
            "status": self.status,
            "objective": self.objective,
            "predicted_degradation": self.predicted_deg,
            "predicted_drop_pct": self.predicted_drop,
            "size_bytes": self.size_bytes,
            "bops": self.bops,
            "seconds": self.seconds,
        }


class InfeasibleBudget(QcliError):
    """No allocation meets the budget; `reachable` is the best any allocation reaches."""

    def __init__(self, budget: Budget, reachable: float) -> None:
        what = {
            "size": f"the smallest reachable size is {_num(reachable)} bytes",
            "bops": f"the fewest reachable bit-operations are {reachable:,.0f}",
            "drop": f"the smallest reachable summed drop is {reachable:.3f}%",
        }[budget.kind]
        super().__init__(
            f"no allocation meets the {budget.kind} budget {budget.value:,.6g}: {what}"
        )
        self.reachable = reachable


def _num(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


# -- costs of a choice -------------------------------------------------------------------------


def weight_bits_total(units: Sequence[Unit], bits: dict[str, int]) -> int:
    return sum(u.params * bits[u.name] for u in units if u.kind == "weight")


def weight_bytes(units: Sequence[Unit], bits: dict[str, int]) -> float:
    """Packed weight size in bytes (fractional when a layer's bits do not fill whole bytes)."""
    return weight_bits_total(units, bits) / 8


def bops_total(units: Sequence[Unit], bits: dict[str, int]) -> int:
    return sum(
        u.macs * bits[u.name] * (bits[u.input_unit] if u.input_unit else FLOAT_INPUT_BITS)
        for u in units
        if u.kind == "weight"
    )


def degradation(units: Sequence[Unit], bits: dict[str, int]) -> float:
    return sum(u.deg[u.bits.index(bits[u.name])] for u in units)


def drop_total(units: Sequence[Unit], bits: dict[str, int]) -> float:
    """Summed drop the allocation adds over every unit at its widest width."""
    return sum(u.added_drop(bits[u.name]) for u in units)


def uniform(units: Sequence[Unit], weight_bits: int, act_bits: int) -> dict[str, int]:
    return {u.name: weight_bits if u.kind == "weight" else act_bits for u in units}


def _cost(units: Sequence[Unit], bits: dict[str, int], kind: str) -> float:
    if kind == "size":
        return weight_bytes(units, bits)
    if kind == "bops":
        return float(bops_total(units, bits))
    return drop_total(units, bits)


def _extreme(units: Sequence[Unit], kind: str) -> dict[str, int]:
    """The allocation with the least of the budgeted quantity: the smallest widths for size
    and bit-operations; for a drop budget, each unit's least-dropping width."""
    if kind == "drop":
        return {u.name: min(u.bits, key=u.added_drop) for u in units}
    return {u.name: min(u.bits) for u in units}


def check_feasible(units: Sequence[Unit], budget: Budget) -> None:
    best = _cost(units, _extreme(units, budget.kind), budget.kind)
    if best > budget.value + 1e-9:
        raise InfeasibleBudget(budget, best)


def _validate(units: Sequence[Unit], budget: Budget) -> None:
    names = {u.name for u in units}
    for u in units:
        if u.input_unit is not None and u.input_unit not in names:
            raise ValueError(f"unit {u.name}: input unit {u.input_unit} is not a unit")
        if budget.kind == "drop" and len(u.drop) != len(u.bits):
            raise ValueError(f"unit {u.name}: a drop budget needs top-1 drops per width")


def _result(units, bits, solver, status, objective, start) -> Allocation:
    return Allocation(
        bits=dict(bits),
        solver=solver,
        status=status,
        objective=objective,
        predicted_deg=degradation(units, bits),
        predicted_drop=drop_total(units, bits),
        size_bytes=weight_bytes(units, bits),
        bops=bops_total(units, bits),
        seconds=round(time.perf_counter() - start, 4),
    )


# -- the integer program -----------------------------------------------------------------------


def solve_ip(
    units: Sequence[Unit], budget: Budget, time_limit_s: float = 10.0, seed: int = 0
) -> Allocation:
    """Optimal allocation with CP-SAT (one worker, seeded: the same answer every run)."""
    from ortools.sat.python import cp_model

    _validate(units, budget)
    check_feasible(units, budget)
    start = time.perf_counter()
    m = cp_model.CpModel()
    by_name = {u.name: u for u in units}
    pick = {
        (u.name, b): m.new_bool_var(f"{u.name}@{b}") for u in units for b in u.bits
    }  # pick[unit, width]
    for u in units:
        m.add_exactly_one(pick[u.name, b] for b in u.bits)
    biggest = max((d for u in units for d in u.deg if math.isfinite(d)), default=0.0) or 1.0

    def ideg(d: float) -> int:
        v = round(d / biggest * DEG_RESOLUTION)
        return max(v, 1) if d > 0 else 0

    deg_expr = sum(ideg(u.deg[i]) * pick[u.name, b] for u in units for i, b in enumerate(u.bits))
    size_expr = sum(
        u.params * b * pick[u.name, b] for u in units if u.kind == "weight" for b in u.bits
    )
    if budget.kind == "size":
        m.add(size_expr <= math.floor(budget.value * 8 + 1e-9))
        m.minimize(deg_expr)
    elif budget.kind == "bops":
        m.add(_bops_expr(m, units, by_name, pick) <= math.floor(budget.value + 1e-9))
        m.minimize(deg_expr)
    else:
        # Drops are percents with two decimals of meaning: hundredths of a point as integers.
        drop_expr = sum(
            round(u.added_drop(b) * 10_000) * pick[u.name, b] for u in units for b in u.bits
        )
        m.add(drop_expr <= math.floor(budget.value * 10_000 + 1e-9))
        # Smallest size first; among equal sizes the least degradation (it never outweighs
        # one bit of size: the size term is scaled above the degradation sum's range).
        span = sum(ideg(max(u.deg)) for u in units) + 1
        m.minimize(size_expr * span + deg_expr)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise QcliError(
            f"the bit-allocation solver found no solution ({solver.status_name(status)})"
        )
    bits = {u.name: next(b for b in u.bits if solver.value(pick[u.name, b])) for u in units}
    name = "optimal" if status == cp_model.OPTIMAL else "feasible"
    return _result(units, bits, "cp-sat", name, solver.objective_value, start)


def _bops_expr(m, units, by_name, pick):
    """Σ MACs·w·a, linear through booleans z[l, w, a] = pick[l, w] AND pick[input(l), a]."""
    terms = []
    for u in units:
        if u.kind != "weight":
            continue
        if u.input_unit is None:
            terms += [u.macs * b * FLOAT_INPUT_BITS * pick[u.name, b] for b in u.bits]
            continue
        src = by_name[u.input_unit]
        z = {}
        for w in u.bits:
            for a in src.bits:
                z[w, a] = m.new_bool_var(f"{u.name}@{w}x{a}")
                terms.append(u.macs * w * a * z[w, a])
        # Exactly one z per layer, agreeing with both the layer's and its input's choice.
        for w in u.bits:
            m.add(sum(z[w, a] for a in src.bits) == pick[u.name, w])
        for a in src.bits:
            m.add(sum(z[w, a] for w in u.bits) == pick[src.name, a])
    return sum(terms)


# -- the greedy baseline -----------------------------------------------------------------------


def solve_greedy(units: Sequence[Unit], budget: Budget) -> Allocation:
    """Start at the widest widths; step the unit whose next narrower width costs the least
    degradation per unit of budget saved, until the budget is met (size, bit-operations).
    Under a drop budget: take the step saving the most size per unit of drop while the drop
    stays within budget."""
    _validate(units, budget)
    check_feasible(units, budget)
    start = time.perf_counter()
    bits = {u.name: max(u.bits) for u in units}
    if budget.kind == "drop":
        return _greedy_drop(units, budget, bits, start)
    kind = budget.kind
    while _cost(units, bits, kind) > budget.value + 1e-9:
        best, best_ratio = None, math.inf
        here = _cost(units, bits, kind)
        for u in units:
            lower = [b for b in u.bits if b < bits[u.name]]
            if not lower:
                continue
            nxt = max(lower)
            trial = {**bits, u.name: nxt}
            saved = here - _cost(units, trial, kind)
            if saved <= 0:
                continue
            ddeg = u.deg[u.bits.index(nxt)] - u.deg[u.bits.index(bits[u.name])]
            if ddeg / saved < best_ratio:
                best, best_ratio = (u.name, nxt), ddeg / saved
        if best is None:  # cannot happen after check_feasible; a guard against a loop
            raise InfeasibleBudget(budget, here)
        bits[best[0]] = best[1]
    return _result(units, bits, "greedy", "feasible", degradation(units, bits), start)


def _greedy_drop(units, budget, bits, start) -> Allocation:
    while True:
        best, best_ratio = None, -math.inf
        size, drop = weight_bytes(units, bits), drop_total(units, bits)
        for u in units:
            lower = [b for b in u.bits if b < bits[u.name]]
            if not lower or u.kind != "weight":
                continue
            trial = {**bits, u.name: max(lower)}
            new_drop = drop_total(units, trial)
            if new_drop > budget.value + 1e-9:
                continue
            ratio = (size - weight_bytes(units, trial)) / max(new_drop - drop, 1e-9)
            if ratio > best_ratio:
                best, best_ratio = (u.name, max(lower)), ratio
        if best is None:
            break
        bits[best[0]] = best[1]
    return _result(units, bits, "greedy", "feasible", weight_bytes(units, bits), start)


def allocate(
    units: Sequence[Unit], budget: Budget, solver: str = "ip", seed: int = 0
) -> Allocation:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}")
    return solve_ip(units, budget, seed=seed) if solver == "ip" else solve_greedy(units, budget)
