"""MRECG: mixed reconstruction granularity (Ma et al., CVPR'23).

Block-wise reconstruction leaves a per-unit loss that oscillates along depth instead of
growing smoothly: a unit with less capacity than the one before it amplifies the error it
inherits. MRECG reconstructs the adjacent block pairs with the largest capacity gaps jointly
(the merged unit can absorb the gap), and runs BRECQ or QDrop unchanged on that plan.

Units are the block plan's units U_0..U_{N-1}; the gap d_i belongs to the pair (U_i, U_{i+1}):
- data-free capacity: ModCap(U) = Σ_j α^(s_j − 1)·params_j·b_j over the unit's layers
  (stride s_j, weight bits b_j; α < 1 discounts downsampling), d_i = ModCap_i − ModCap_{i+1};
- loss capacity: the reconstruction loss of each unit after a short base pass is an inverse
  capacity proxy, d_i = L_{i+1} − L_i.
The k largest gaps are merged; the stem (first unit) and the classifier (last) never are, and
overlapping picks chain into groups of at most three, as in the official schemes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from typing import Any

from torch import Tensor

from qcli.errors import UsageError
from qcli.methods.chain import UnitPlan, merge_steps, unit_plan
from qcli.methods.reconstruction import Progress, ReconSettings, UnitResult, reconstruct
from qcli.methods.registry import setting
from qcli.quant.capture import QuantGraph
from qcli.quant.modules import QConv2d
from qcli.quant.partition import Unit

CAPACITIES = ("loss", "data-free")
# Loss capacity by default: on ResNet-20 every data-free gap a merge may take is <= 0 (blocks
# of a stage are equal, and a downsampling block gains more parameters than α = 0.5 takes
# away), so the data-free ranking is a tie broken by depth; the loss profile tells the
# pairs apart for the price of a short pass (`capacity_iters`).
DEFAULT_CAPACITY = "loss"
ALPHA = 0.5
CAPACITY_ITERS = 50  # iterations per unit of the loss-capacity base pass
MAX_GROUP = 3
# Merges as a share of the units when --merges is not given: the published schemes merge
# 2 of ResNet-18's 10 units and 4 of ResNet-50's 18 and RegNetX-600M's ~20 (MobileNetV2,
# 7 of ~20, is the outlier that depthwise gaps explain).
MERGE_SHARE = 0.2


def default_merges(units: int) -> int:
    return max(1, round(MERGE_SHARE * units))


@dataclass(frozen=True)
class MrecgSettings:
    """MRECG's settings, read under --granularity mrecg (None: not given, the default
    applies)."""

    merges: int | None = setting(  # pairs merged (default: default_merges)
        "--merges",
        "MRECG: adjacent block pairs to merge [a fifth of the blocks].",
        kind=int,
        low=0,
    )
    capacity: str | None = setting(  # "loss" (default) or "data-free"
        "--capacity",
        "MRECG: rank gaps by the per-block loss of a short base reconstruction [loss], or "
        "by parameters x bits x stride discount (data-free, needs no data for --show-units).",
        choices=CAPACITIES,
    )
    capacity_alpha: float | None = setting(  # data-free: stride discount α (0.5)
        "--capacity-alpha",
        "MRECG --capacity data-free: discount per stride step [0.5].",
        kind=float,
        low=0,
        high=1,
        low_open=True,
    )
    capacity_iters: int | None = setting(  # loss: iterations per unit of the base pass (50)
        "--capacity-iters",
        "MRECG --capacity loss: iterations per block of the base pass [50].",
        kind=int,
        low=1,
    )

    @property
    def kind(self) -> str:
        """The capacity used: the given one or the default."""
        return self.capacity or DEFAULT_CAPACITY

    def base_pass_iters(self, iters: int) -> int:
        """Iterations per unit of the loss-capacity base pass (0: none), within `iters`."""
        return min(self.capacity_iters or CAPACITY_ITERS, iters) if self.kind == "loss" else 0


def validate(m: MrecgSettings | None, given: MrecgSettings) -> None:
    """`m`: the settings under --granularity mrecg, else None with `given` what was passed
    (then any MRECG setting is a usage error)."""
    if m is None:
        named = [f for f in ("merges", "capacity", "capacity_alpha", "capacity_iters")
                 if getattr(given, f) is not None]  # fmt: skip
        if named:
            raise UsageError(f"--{named[0].replace('_', '-')} applies to --granularity mrecg only")
        return
    if m.capacity is not None and m.capacity not in CAPACITIES:
        raise UsageError(f"--capacity must be one of {', '.join(CAPACITIES)}")
    if m.capacity_alpha is not None and m.kind != "data-free":
        raise UsageError("--capacity-alpha applies to --capacity data-free only")
    if m.capacity_iters is not None and m.kind != "loss":
        raise UsageError("--capacity-iters applies to --capacity loss only")
    if m.merges is not None and m.merges < 0:
        raise UsageError(f"--merges must be >= 0, got {m.merges}")
    if m.capacity_alpha is not None and not 0 < m.capacity_alpha <= 1:
        raise UsageError(f"--capacity-alpha must be within (0, 1], got {m.capacity_alpha}")
    if m.capacity_iters is not None and m.capacity_iters < 1:
        raise UsageError(f"--capacity-iters must be at least 1, got {m.capacity_iters}")


# ------------------------------------------------------------------------------ capacity


@dataclass(frozen=True)
class LayerTerm:
    """What ModCap reads of one conv/linear layer."""

    params: int
    stride: int
    bits: int


def modcap(terms: Sequence[LayerTerm], alpha: float = ALPHA) -> float:
    """ModCap(U) = Σ α^(s−1)·params·bits: weight storage, discounted per downsampling step."""
    return float(sum(alpha ** (t.stride - 1) * t.params * t.bits for t in terms))


def layer_terms(qg: QuantGraph, unit: Unit) -> list[LayerTerm]:
    """The unit's layers as ModCap terms (a float layer counts at 32 bits)."""
    terms = []
    for path in unit.layers:
        m = qg.module.get_submodule(path)
        stride = max(m.stride) if isinstance(m, QConv2d) else 1
        q = m.weight_quantizer
        terms.append(LayerTerm(m.weight.numel(), int(stride), q.spec.bits if q else 32))
    return terms


def capacity_gaps(caps: Sequence[float]) -> list[float]:
    """Data-free gaps: d_i = ModCap_i − ModCap_{i+1} (the later unit has less capacity)."""
    return [a - b for a, b in pairwise(caps)]


def loss_gaps(losses: Sequence[float]) -> list[float]:
    """Loss gaps: d_i = L_{i+1} − L_i (the later unit's loss jumps up)."""
    return [b - a for a, b in pairwise(losses)]


# ------------------------------------------------------------------------------- merging


def choose_merges(
    gaps: Sequence[float], k: int, protected: frozenset[int] = frozenset()
) -> list[tuple[int, ...]]:
    """Groups of adjacent unit indices to reconstruct jointly: the k largest gaps d_i (pair
    i, i+1; ties to the shallower pair), skipping pairs that touch a protected unit or would
    chain a group past MAX_GROUP units. Groups come back in depth order."""
    order = sorted(range(len(gaps)), key=lambda i: (-gaps[i], i))
    group_of: dict[int, set[int]] = {}
    taken = 0
    for i in order:
        if taken >= k:
            break
        if i in protected or i + 1 in protected:
            continue
        joined = group_of.get(i, {i}) | group_of.get(i + 1, {i + 1})
        if len(joined) > MAX_GROUP:
            continue
        for u in joined:
            group_of[u] = joined
        taken += 1
    groups = {tuple(sorted(g)) for g in group_of.values()}
    return sorted(groups)


def merged_plan(plan: UnitPlan, groups: Sequence[tuple[int, ...]]) -> UnitPlan:
    """The block plan with each group of units (indices among the plan's units) joined; steps
    without a unit lying between the group's units join it too."""
    step_of = [i for i, step in enumerate(plan) for _ in step.units]
    spans = [tuple(range(step_of[g[0]], step_of[g[-1]] + 1)) for g in groups]
    return merge_steps(plan, spans)


def protected_units(count: int) -> frozenset[int]:
    """The stem and the classifier stay alone."""
    return frozenset({0, count - 1})


# -------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Decision:
    """Which units MRECG merged and why: per-unit capacity values (ModCap, or base-pass loss),
    the gaps between neighbours, and the groups picked (unit indices)."""

    capacity: str
    units: tuple[str, ...]
    values: tuple[float, ...]
    gaps: tuple[float, ...]
    merges: int
    groups: tuple[tuple[int, ...], ...]
    alpha: float | None = None
    capacity_iters: int | None = None

    def merged(self) -> list[dict[str, Any]]:
        """One row per group: its units and the gaps inside it that were picked."""
        return [
            {
                "units": [self.units[i] for i in g],
                "gaps": [round(self.gaps[i], 6) for i in g[:-1]],
            }
            for g in self.groups
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "merged": self.merged()}


def decide(
    capacity: str,
    units: Sequence[str],
    values: Sequence[float],
    merges: int | None,
    **extra: Any,
) -> Decision:
    """The merge decision from per-unit values (ModCap for data-free, loss for loss)."""
    gaps = capacity_gaps(values) if capacity == "data-free" else loss_gaps(values)
    k = default_merges(len(units)) if merges is None else merges
    groups = choose_merges(gaps, k, protected_units(len(units)))
    return Decision(capacity, tuple(units), tuple(values), tuple(gaps), k, tuple(groups), **extra)


def plan_units(plan: UnitPlan) -> list[Unit]:
    return [u for step in plan for u in step.units]


def data_free_decision(
    qg: QuantGraph, merges: int | None, alpha: float = ALPHA
) -> tuple[UnitPlan, Decision]:
    """Merge by module capacity: needs the graph only, no data."""
    plan = unit_plan(qg, "block")
    units = plan_units(plan)
    caps = [modcap(layer_terms(qg, u), alpha) for u in units]
    d = decide("data-free", [u.name for u in units], caps, merges, alpha=alpha)
    return merged_plan(plan, d.groups), d


# The base pass: (graph copy, block plan, its iterations) -> per-unit loss after reconstruction.
BasePass = Callable[[QuantGraph, UnitPlan, int], list[float]]


def loss_decision(
    qg: QuantGraph, merges: int | None, iters: int, base_pass: BasePass
) -> tuple[UnitPlan, Decision]:
    """Merge by the loss profile of a short base reconstruction on a copy of the graph."""
    plan = unit_plan(qg, "block")
    units = plan_units(plan)
    losses = base_pass(copy.deepcopy(qg), plan, iters)
    d = decide("loss", [u.name for u in units], losses, merges, capacity_iters=iters)
    return merged_plan(plan, d.groups), d


# --------------------------------------------------------------------------- oscillation


OSCILLATION = (
    "per-unit reconstruction loss after tuning along depth; oscillation: decreases = how "
    "often L_i > L_{i+1}, total_decrease = the sum of those drops, relative = that sum over "
    "the largest loss (0: the loss never falls with depth)"
)


def oscillation(losses: Sequence[float]) -> dict[str, float]:
    """How far a per-unit loss profile (in depth order) is from non-decreasing.

    Theorem 1 of the seed: quantization error accumulates, so between equivalent neighbours
    the later unit's reconstruction loss is at least the earlier one's; every decrease
    L_i > L_{i+1} is a swing that capacity gaps cause. `decreases` counts them,
    `total_decrease` sums L_i − L_{i+1} over them, `relative` divides that sum by the
    profile's largest loss (comparable across models and bit widths). 0 means monotone.
    """
    drops = [a - b for a, b in pairwise(losses) if a > b]
    peak = max(losses, default=0.0)
    total = float(sum(drops))
    rel = total / peak if peak > 0 and math.isfinite(peak) else 0.0
    return {"decreases": len(drops), "total_decrease": total, "relative": rel}


def depths(decision: Decision | None, count: int) -> list[int]:
    """Block index of each unit's output, so merged and unmerged profiles share an axis (a
    merged unit ends where its last block does)."""
    if decision is None:
        return list(range(count))
    ends = {g[0]: g[-1] for g in decision.groups}
    inside = {i for g in decision.groups for i in g[1:]}
    return [ends.get(i, i) for i in range(len(decision.units)) if i not in inside]


def profile(
    results: Sequence[Any], decision: Decision | None, key: str = "loss_after"
) -> dict[str, Any]:
    """A run's per-unit loss along depth with its oscillation (`results`: UnitResult-likes or
    their dicts)."""

    def get(r: Any, k: str) -> Any:
        return r[k] if isinstance(r, dict) else getattr(r, k)

    losses = [float(get(r, key)) for r in results]
    return {
        "units": [get(r, "name") for r in results],
        "depth": depths(decision, len(results)),
        "loss": losses,
        "oscillation": oscillation(losses),
    }


# ------------------------------------------------------------------ the unit-plan provider


@dataclass(frozen=True)
class PlanChoice:
    """The plan a run reconstructs, and for MRECG the decision behind it and the base pass's
    per-unit results (loss capacity only)."""

    plan: UnitPlan
    decision: Decision | None = None
    base: tuple[UnitResult, ...] = ()


def choose_plan(
    qg: QuantGraph,
    s: ReconSettings,
    m: MrecgSettings,
    images: Tensor | None,
    progress: Progress | None = None,
) -> PlanChoice:
    """The block plan with the chosen merges. The loss capacity runs the engine for
    `capacity_iters` per unit on a copy of the range-initialized graph, so it needs the
    calibration images."""
    if m.kind == "data-free":
        plan, d = data_free_decision(qg, m.merges, m.capacity_alpha or ALPHA)
        return PlanChoice(plan, d)
    if images is None:
        raise UsageError(
            "--capacity loss ranks units by a short reconstruction on the calibration images: "
            "give --data, or use --capacity data-free"
        )
    base: list[UnitResult] = []

    def base_pass(copy: QuantGraph, plan: UnitPlan, iters: int) -> list[float]:
        base.extend(reconstruct(copy, images, replace(s, iters=iters), progress, plan))
        return [r.loss_after for r in base]

    plan, d = loss_decision(qg, m.merges, m.base_pass_iters(s.iters), base_pass)
    return PlanChoice(plan, d, tuple(base))


def oscillation_report(
    qg: QuantGraph, choice: PlanChoice, results: list[UnitResult]
) -> dict[str, Any]:
    """The per-unit loss along depth (see `oscillation`) of the run, of the same units
    before they were tuned, and of MRECG's base pass when one ran; `axis` names the depth
    positions (MRECG: the blocks, a merged unit sits at its last block)."""
    axis = list(choice.decision.units) if choice.decision else [r.name for r in results]
    profiles = {
        "reconstructed": profile(results, choice.decision),
        "before reconstruction": profile(results, choice.decision, "loss_before"),
    }
    if choice.base:
        iters = choice.decision.capacity_iters if choice.decision else None
        profiles[f"block base pass ({iters} iters/unit)"] = profile(choice.base, None)
    return {"definition": OSCILLATION, "axis": axis, "profiles": profiles}
