"""Walk a quantized graph unit by unit with cached activations, for methods that tune layers
in order (reconstruction, BN tuning, bias tuning).

Two tensors are cached at the current single-tensor cut: the quantized model's activation
(earlier units already tuned) and the float model's. Each segment is run once per image to
advance them, so a walk costs one forward pass of the network, however many units there are;
values inside a segment (a layer within a residual block) come from re-running that segment's
prefix. Caches live on the CPU in float16 by default: 1,024 EfficientNet-Lite0 images need
well under 8 GB at the widest cut.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qcli.quant.capture import QuantGraph, set_float
from qcli.quant.partition import (
    Unit,
    check_chain,
    join_units,
    layer_units,
    partition,
    prefix_unit,
    unit_module,
)


def float_twin(qg: QuantGraph) -> QuantGraph:
    """A frozen copy with every quantizer off: the float targets, whatever later tuning does
    to the weights of the original."""
    twin = copy.deepcopy(qg)
    set_float(twin)
    for p in twin.module.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def run_batched(
    module: Callable[[Tensor], Tensor],
    x: Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """module(x) in batches on `device`, written into one preallocated CPU tensor of the cache
    dtype (gathering a list and concatenating would hold every cache twice at its peak), laid
    out as the module's output (channels_last stays channels_last)."""
    out: Tensor | None = None
    for i in range(0, x.shape[0], batch_size):
        y = module(x[i : i + batch_size].to(device, torch.float32))
        if out is None:
            layout = (
                torch.channels_last
                if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format
            )
            out = torch.empty((x.shape[0], *y.shape[1:]), dtype=dtype, memory_format=layout)
        out[i : i + y.shape[0]] = y.to("cpu", dtype)
    assert out is not None, "run_batched needs at least one image"
    return out


@dataclass(frozen=True)
class UnitData:
    """What a unit is tuned on, one row per image: the quantized model's input to the unit
    (earlier units tuned), the float model's input, and the float model's output (target)."""

    xq: Tensor
    xf: Tensor
    y: Tensor


@dataclass
class Chain:
    """Quantized and float activations of every calibration image at the current cut."""

    qg: QuantGraph
    fp: QuantGraph
    q: Tensor
    f: Tensor
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    passed: list[Unit] = field(default_factory=list)  # segments advanced past, in order

    @classmethod
    def start(
        cls,
        qg: QuantGraph,
        images: Tensor,
        batch_size: int,
        dtype: torch.dtype = torch.float16,
        reference: QuantGraph | None = None,
    ) -> Chain:
        """`reference`: the float model (default: a float twin of qg as it is now, which is
        the float model only if no method has changed its weights yet)."""
        device = next(qg.module.parameters()).device
        x = images.to("cpu", dtype)
        fp = reference if reference is not None else float_twin(qg)
        return cls(qg, fp, x, x, batch_size, dtype, device)

    def replay(self, images: Tensor, dtype: torch.dtype | None = None) -> Chain:
        """A chain over other images (e.g. transformed ones) at this chain's cut: both models
        as they stand now are run over the segments already passed."""
        dtype = dtype or self.dtype
        x = images.detach().to("cpu", dtype)
        other = Chain(self.qg, self.fp, x, x, self.batch_size, dtype, self.device)
        for seg in self.passed:
            other.advance(seg)
        return other

    def _run(self, unit: Unit | None, x: Tensor, quantized: bool) -> Tensor:
        if unit is None:
            return x
        module = unit_module(self.qg if quantized else self.fp, unit)
        return run_batched(module, x, self.batch_size, self.device, self.dtype)

    def inputs(self, segment: Unit, unit: Unit, quantized: bool = True) -> Tensor:
        """The unit's input for every image: quantized model (tuned so far) or float model."""
        prefix = prefix_unit(self.qg, segment, unit.input)
        return self._run(prefix, self.q if quantized else self.f, quantized)

    def targets(self, unit: Unit, float_inputs: Tensor) -> Tensor:
        """The float model's output of the unit, from `inputs(..., quantized=False)`."""
        return self._run(unit, float_inputs, quantized=False)

    def unit_data(self, segment: Unit, unit: Unit) -> UnitData:
        xf = self.inputs(segment, unit, quantized=False)
        return UnitData(self.inputs(segment, unit), xf, self.targets(unit, xf))

    def advance(self, segment: Unit) -> None:
        """Move both caches past the segment (call after its units are tuned)."""
        self.q = self._run(segment, self.q, quantized=True)
        self.f = self._run(segment, self.f, quantized=False)
        self.passed.append(segment)


@dataclass(frozen=True)
class PlanStep:
    """One stretch of the walk: `units` are tuned in order, then the caches move past
    `segment` (a single-tensor cut: the unit itself at block granularity, or the block that
    holds the layers at layer granularity)."""

    segment: Unit
    units: tuple[Unit, ...]


# The walk, as data: granularity is one way to build it, merging adjacent steps another.
UnitPlan = tuple[PlanStep, ...]


def unit_plan(qg: QuantGraph, granularity: str) -> UnitPlan:
    """The plan of a granularity. Segments are single-tensor cuts (the finest ones at layer
    granularity, whose units are then the layers inside); a block or stage segment is its own
    unit."""
    segs = partition(qg, granularity)
    check_chain(segs)
    if granularity == "layer":
        return tuple(PlanStep(seg, tuple(layer_units(qg, seg))) for seg in segs)
    return tuple(PlanStep(seg, (seg,) if seg.layers else ()) for seg in segs)


def merge_steps(plan: UnitPlan, groups: list[tuple[int, ...]]) -> UnitPlan:
    """The plan with each group of adjacent steps (indices into `plan`, consecutive) joined
    into one unit reconstructed jointly. Only whole-segment steps can be joined."""
    first = {g[0]: g for g in groups}
    inside = {i for g in groups for i in g}
    out: list[PlanStep] = []
    for i, step in enumerate(plan):
        if i in first:
            g = first[i]
            if list(g) != list(range(g[0], g[0] + len(g))) or g[-1] >= len(plan):
                raise ValueError(f"steps {g} are not adjacent steps of the plan")
            steps = [plan[j] for j in g]
            if any(s.units not in ((s.segment,), ()) for s in steps):
                raise ValueError("only block or stage steps (a unit per segment) can be merged")
            seg = join_units([s.segment for s in steps])
            out.append(PlanStep(seg, (seg,) if seg.layers else ()))
        elif i not in inside:
            out.append(step)
    return tuple(out)
