"""Reconstruction PTQ: the engine the reconstruction methods are recipes over
(`methods/recipes.py`).

Units (layers, blocks or stages) are tuned in order so that each quantized unit, fed the
quantized model's activations, reproduces the float model's output of that unit on the
calibration images ("asymmetric" reconstruction). What is learned (`ReconSettings`: rounding,
weights, step sizes, QDrop's drop probability, the Fisher loss) is a setting; which units
(`UnitPlan`), where their data comes from and their loss (`Seams`) are the engine's
parameters, so a method plugs in without copying the walk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcli.errors import UsageError
from qcli.methods.chain import Chain, UnitData, UnitPlan, run_batched, unit_plan
from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.methods.registry import setting
from qcli.quant import primitives as P
from qcli.quant.capture import QuantGraph
from qcli.quant.modules import QConv2d, QLinear
from qcli.quant.partition import GRANULARITIES, Unit, unit_module
from qcli.quant.quantizer import Quantizer, QuantMode, dropping
from qcli.quant.rounding import AdaRound, attach_adaround, bake_rounding

# progress(n) reports n steps done; progress(0, skip=k) drops k planned steps from the total
# (a unit that stopped early), so the time-left estimate stays honest.
Progress = Callable[..., None]
# One optimization step of a unit: the regularizer's exponent in (None: none yet), the
# reconstruction loss of the step out.
Step = Callable[[float | None], Tensor]
# A unit's loss: (prediction, target, Fisher weight or None) -> scalar.
UnitLoss = Callable[[Tensor, Tensor, Tensor | None], Tensor]
# Where a unit's data comes from, given the walk's chain, the segment and the unit.
UnitInputs = Callable[[Chain, Unit, Unit], UnitData]


STOPS = ("fixed", "plateau")


@dataclass(frozen=True)
class ReconSettings:
    granularity: str = "block"  # the default plan: a partition (see `partition`)
    # per unit; the papers use 10k-20k on a GPU (see benchmarks/ptq.md)
    iters: int = setting(
        "--iters",
        "Reconstruction iterations per unit [500; the papers use 10000-20000].",
        default=500,
        kind=int,
        low=1,
    )
    # "fixed": every unit runs `iters`. "plateau": `iters` is a ceiling; the free phase (no
    # rounding regularizer, constant lr) ends when the loss stops improving by `plateau_tol`
    # per `plateau_window` steps (`plateau_patience` windows in a row), and the annealing
    # phase then lasts (1 - warmup) / warmup times as long, so a unit's effort follows how
    # hard it is (`_free_phase`, `_anneal_steps`).
    stop: str = setting(
        "--stop",
        "Reconstruction effort: every unit runs --iters [fixed], or --iters is a ceiling and "
        "a unit stops when its loss stops improving [plateau].",
        default="fixed",
        choices=STOPS,
    )
    plateau_window: int = 10
    plateau_tol: float = 0.02
    plateau_patience: int = 2
    # A compute ceiling, in billions of activation elements the units produce over all steps
    # (`unit_cost` x images per step x steps): when set, `iters` shrinks to fit it, so one
    # default suits a 32x32 ResNet and a 224x224 EfficientNet alike (0: no budget).
    budget: float = 0.0
    batch_size: int = setting(
        "--recon-batch",
        "Reconstruction images per iteration [32; the larger-batch finding of Ma et al., "
        "CVPR'23: 256].",
        default=32,
        kind=int,
        low=1,
    )
    rounding: bool = True  # AdaRound's learned rounding (else round to nearest)
    learn_weights: bool = False  # AdaQuant: continuous weights, biases, weight step sizes
    learn_act_scales: bool = True
    drop_prob: float = setting(  # QDrop: chance an activation element stays float
        "--drop-prob",
        "QDrop: chance an activation stays float during reconstruction [qdrop: 0.5].",
        default=0.0,
        kind=float,
        low=0,
        high=1,
    )
    fisher: bool = setting(
        "--fisher", "BRECQ/QDrop: Fisher-weighted output loss.", default=False, kind=bool
    )
    reg_weight: float = 0.01  # AdaRound's λ
    beta: tuple[float, float] = (20.0, 2.0)  # annealed exponent of the rounding regularizer
    warmup: float = 0.2  # share of iterations before the regularizer starts
    lr_rounding: float = 1e-2  # the papers use 1e-3 over 10-20k iterations; see ptq.md
    # Step-size and weight learning rates are relative to each tensor's mean magnitude, so one
    # value fits 8-bit and 2-bit grids alike (Adam moves a parameter by ~lr per step).
    lr_act_scale: float = 1e-3
    lr_weight_scale: float = 1e-3
    lr_weight: float = 1e-3
    lr_bias: float = 1e-3
    range_method: str = "mse"
    eval_images: int = 256  # images on which the per-unit loss before/after is measured
    cache_dtype: str = "float16"
    seed: int = 0


def validate(s: ReconSettings) -> None:
    """Values the engine cannot run with, as usage errors naming the flag."""
    if s.granularity not in GRANULARITIES:
        raise UsageError(f"--granularity must be one of {', '.join(GRANULARITIES)}")
    if s.iters < 1:
        raise UsageError(f"--iters must be at least 1, got {s.iters}")
    if not 0 <= s.drop_prob <= 1:
        raise UsageError(f"--drop-prob must be within 0..1, got {s.drop_prob}")
    if s.stop not in STOPS:
        raise UsageError(f"--stop must be one of {', '.join(STOPS)}, got {s.stop!r}")
    if s.stop == "plateau" and not 0 < s.warmup < 1:
        raise UsageError("--stop plateau needs a warm-up share within 0..1 (exclusive)")
    if s.budget < 0:
        raise UsageError(f"the reconstruction budget must be >= 0, got {s.budget}")
    if s.plateau_window < 1 or s.plateau_patience < 1 or s.plateau_tol < 0:
        raise UsageError("the plateau window and patience must be at least 1, the tolerance >= 0")
    if s.fisher and s.granularity == "layer":
        raise UsageError("--fisher needs --granularity block or stage")
    if s.batch_size < 1:
        raise UsageError(f"--recon-batch must be at least 1, got {s.batch_size}")


# -------------------------------------------------------------------------------- losses


def reconstruction_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Squared error summed over channels, averaged over images and positions (BRECQ's
    normalization, which AdaRound's λ is tuned against); `weight` is the Fisher diagonal."""
    err = (pred - target).pow(2)
    if weight is not None:
        err = err * weight.pow(2)
    return err.sum(1).mean() if err.ndim > 1 else err.mean()


def beta_at(step: int, s: ReconSettings) -> float | None:
    """The regularizer's exponent at a step, or None during warm-up (no regularizer)."""
    start = int(s.warmup * s.iters)
    if step < start:
        return None
    t = (step - start) / max(s.iters - start, 1)
    hi, lo = s.beta
    return lo + (hi - lo) * (1 - t)


# ------------------------------------------------------------------------- one unit


@dataclass
class UnitResult:
    name: str
    layers: int
    loss_before: float
    loss_after: float
    steps: int
    seconds: float
    cache_mb: float  # cached activations held while this unit was tuned


def unit_parts(module: nn.Module) -> tuple[list[QConv2d | QLinear], list[Quantizer]]:
    """A unit's conv/linear layers and its active activation quantizers (no side effect)."""
    layers = [m for m in module.modules() if isinstance(m, QConv2d | QLinear)]
    weight_qs = {id(m.weight_quantizer) for m in layers}
    acts = [
        m
        for m in module.modules()
        if isinstance(m, Quantizer) and id(m) not in weight_qs and m.mode is not QuantMode.OFF
    ]
    return layers, acts


def _relative_group(params: list[Tensor], lr: float) -> dict[str, Any]:
    scale = torch.stack([p.detach().abs().mean() for p in params]).mean().clamp(min=1e-8)
    return {"params": params, "lr": lr * float(scale)}


def learnables(
    layers: list[QConv2d | QLinear], acts: list[Quantizer], s: ReconSettings
) -> tuple[list[dict[str, Any]], list[AdaRound]]:
    """Parameter groups for the optimizer, and the rounding modules (for the regularizer).

    Attaches a fresh AdaRound to each quantized layer's weight quantizer when `s.rounding`:
    `reconstruct_unit` bakes it in; a caller that only wants the tensors (a meta-learned
    input source) wraps the call in `quant.rounding.rounding_restored`."""
    groups: list[dict[str, Any]] = []
    roundings = []
    quantized = [m for m in layers if m.weight_quantizer is not None]
    if s.rounding:
        roundings = [attach_adaround(m.weight_quantizer, m.weight) for m in quantized]
        if roundings:
            groups.append({"params": [r.v for r in roundings], "lr": s.lr_rounding})
    if s.learn_weights and quantized:
        groups.append(_relative_group([m.weight for m in quantized], s.lr_weight))
        groups.append(
            _relative_group([m.weight_quantizer.scale for m in quantized], s.lr_weight_scale)
        )
        biases = [m.bias for m in quantized if m.bias is not None]
        if biases:
            groups.append({"params": biases, "lr": s.lr_bias})
    if s.learn_act_scales and acts:
        groups.append(_relative_group([q.scale for q in acts], s.lr_act_scale))
    return groups, roundings


def _eval_loss(module: nn.Module, x: Tensor, y: Tensor, w: Tensor | None, s, device, loss) -> float:
    n = min(s.eval_images, x.shape[0])
    with torch.no_grad():
        pred = run_batched(module, x[:n], s.batch_size, device, torch.float32)
        wn = w[:n].float() if w is not None else None
        return float(loss(pred, y[:n].float(), wn))


def reconstruct_unit(
    module: nn.Module,
    xq: Tensor,
    xf: Tensor | None,
    y: Tensor,
    s: ReconSettings,
    generator: torch.Generator,
    progress: Progress | None = None,
    fisher: Tensor | None = None,
    *,
    drops: torch.Generator | None = None,
    loss: UnitLoss | None = None,
    wrap: Callable[[Step], Step] | None = None,
) -> tuple[float, float, int]:
    """Tune one unit in place so module(xq) ≈ y; returns the loss before and after, and the
    optimization steps taken.

    xq: the quantized model's inputs; xf: the float model's (QDrop mixes them), y: targets.
    `generator` draws the batches (and seeds the input masks); `drops` draws QDrop's masks
    inside the quantizers (default: seeded from `generator`). `loss` replaces the
    reconstruction loss; `wrap` wraps each optimization step (e.g. to log or to interleave
    another update). Ends with hard rounding baked into the weights and every parameter
    frozen again.
    """
    device = next(module.parameters()).device
    loss = loss or reconstruction_loss
    layers, acts = unit_parts(module)
    before = _eval_loss(module, xq, y, fisher, s, device, loss)
    groups, roundings = learnables(layers, acts, s)
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    if s.drop_prob > 0 and drops is None:
        drops = _mask_generator(generator, device, fresh=True)
    steps = 0
    try:
        with dropping(acts, s.drop_prob, drops):
            if params:
                steps = _optimize(
                    module, groups, roundings, xq, xf, y, fisher, s, generator, progress,
                    loss, wrap,
                )  # fmt: skip
            elif progress:
                progress(s.iters)
    finally:
        for m in layers:
            if m.weight_quantizer is not None:
                bake_rounding(m.weight, m.weight_quantizer)
        for p in params:
            p.requires_grad_(False)
        _keep_scales_positive(layers, acts)
    return before, _eval_loss(module, xq, y, fisher, s, device, loss), steps


def _optimize(
    module, groups, roundings, xq, xf, y, fisher, s, generator, progress, loss, wrap
) -> int:
    """Run the unit's optimization; returns the number of steps taken."""
    device = next(module.parameters()).device
    opt = torch.optim.Adam(groups)
    layers, acts = unit_parts(module)
    n = xq.shape[0]
    mask_gen = _mask_generator(generator, device) if s.drop_prob > 0 and xf is not None else None

    def step(beta: float | None) -> Tensor:
        idx = torch.randint(n, (min(s.batch_size, n),), generator=generator)
        x = xq[idx].to(device, torch.float32)
        if mask_gen is not None:
            keep_float = P.random_mask(x.shape, s.drop_prob, device, generator=mask_gen)
            x = torch.where(keep_float, xf[idx].to(device, torch.float32), x)
        w = fisher[idx].to(device, torch.float32) if fisher is not None else None
        rec = loss(module(x), y[idx].to(device, torch.float32), w)
        total = rec
        if roundings and beta is not None:
            total = total + s.reg_weight * sum(r.regularizer(beta) for r in roundings)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        _keep_scales_positive(layers, acts)
        if progress:
            progress(1)
        return rec.detach()

    if wrap is not None:
        step = wrap(step)
    if s.stop == "fixed":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.iters, eta_min=0.0)
        for i in range(s.iters):
            step(beta_at(i, s))
            sched.step()
        return s.iters
    free = _free_phase(step, s)
    anneal = _anneal_steps(free, s)
    if progress:
        progress(0, skip=s.iters - free - anneal)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=anneal, eta_min=0.0)
    tail = replace(s, iters=anneal, warmup=0.0)
    for i in range(anneal):
        step(beta_at(i, tail))
        sched.step()
    return free + anneal


def _free_phase(step: Callable[[float | None], Tensor], s: ReconSettings) -> int:
    """Steps without the rounding regularizer at a constant lr until `plateau_patience`
    windows in a row fail to beat the best window-mean loss by `plateau_tol` (relative), at
    most `warmup * iters` steps; returns the steps taken. Comparing with the best rather than
    the previous window keeps minibatch noise (many images, small batches) from ending the
    phase by chance."""
    limit = max(1, int(s.warmup * s.iters))
    best = math.inf
    taken = bad = 0
    while taken < limit and bad < s.plateau_patience:
        count = min(s.plateau_window, limit - taken)
        total = sum(step(None) for _ in range(count))
        taken += count
        mean = float(total) / count
        if mean > best * (1 - s.plateau_tol):
            bad += 1
        else:
            bad = 0
        best = min(best, mean)
    return taken


def _anneal_steps(free: int, s: ReconSettings) -> int:
    """The annealing phase keeps the fixed schedule's ratio to the free phase, within the
    ceiling."""
    return max(1, min(round(free * (1 - s.warmup) / s.warmup), s.iters - free))


def _mask_generator(
    generator: torch.Generator, device: torch.device, fresh: bool = False
) -> torch.Generator:
    """A generator on the device QDrop's input masks are drawn on (drawing them on the CPU and
    copying them over costs a transfer per step), seeded from the run's generator (`fresh`:
    a separate stream even on the same device)."""
    if generator.device == device and not fresh:
        return generator
    seed = int(torch.randint(2**62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def _keep_scales_positive(layers, acts) -> None:
    for m in layers:
        if m.weight_quantizer is not None:
            m.weight_quantizer.scale.clamp_(min=1e-8)
    for q in acts:
        q.scale.clamp_(min=1e-8)


# ------------------------------------------------------------------------- the walk


def cached_inputs(chain: Chain, segment: Unit, unit: Unit) -> UnitData:
    """The default source of a unit's data: the chain's cached activations."""
    return chain.unit_data(segment, unit)


@dataclass(frozen=True)
class Seams:
    """Where methods built on the engine change it, without copying the walk: where a unit's
    data comes from, its loss, and a wrapper around each optimization step (given the unit)."""

    inputs: UnitInputs = cached_inputs
    loss: UnitLoss = reconstruction_loss
    wrap_step: Callable[[Unit, Step], Step] | None = None


def run_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The run's randomness, never the global RNG: batch draws (CPU) and QDrop's in-quantizer
    masks (on the device), both from `seed`."""
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed)


def reconstruct(
    qg: QuantGraph,
    images: Tensor,
    s: ReconSettings,
    progress: Progress | None = None,
    plan: UnitPlan | None = None,
    seams: Seams = Seams(),
) -> list[UnitResult]:
    """Tune every unit of a range-initialized graph, in order: the units of `plan` (default:
    the plan of `s.granularity`)."""
    device = next(qg.module.parameters()).device
    generator, drops = run_generators(s.seed, device)
    for p in qg.module.parameters():  # only what a unit learns may carry gradients
        p.requires_grad_(False)
    chain = Chain.start(qg, images, s.batch_size, getattr(torch, s.cache_dtype))
    fp_logits = _logits(chain, images) if s.fisher else None
    plan = plan if plan is not None else unit_plan(qg, s.granularity)
    count = sum(len(step.units) for step in plan)
    results = []
    for i, step in enumerate(plan):
        seg = step.segment
        for unit in step.units:
            start = time.perf_counter()
            unit_progress = _unit_progress(progress, unit, qg, len(results) + 1, count)
            data = seams.inputs(chain, seg, unit)
            xf = data.xf if s.drop_prob > 0 else None  # only QDrop mixes float inputs in
            w = _fisher(chain, plan[i:], fp_logits) if fp_logits is not None else None
            module = unit_module(qg, unit)
            wrap = (lambda f, u=unit: seams.wrap_step(u, f)) if seams.wrap_step else None
            before, after, steps = reconstruct_unit(
                module,
                data.xq,
                xf,
                data.y,
                s,
                generator,
                unit_progress,
                w,
                drops=drops,
                loss=seams.loss,
                wrap=wrap,
            )
            secs = time.perf_counter() - start
            cached = (chain.q, chain.f, data.xq, xf, data.y, w)
            held = sum({id(t): t.nbytes for t in cached if t is not None}.values())
            results.append(
                UnitResult(unit.name, len(unit.layers), before, after, steps, secs, held / 2**20)
            )
            del data
        chain.advance(seg)
    return results


def _unit_progress(
    progress: Progress | None, unit: Unit, qg: QuantGraph, index: int, count: int
) -> Progress | None:
    """Iterations reported as cost-weighted steps, with the unit's name on the first one."""
    if progress is None:
        return None
    cost = unit_cost(qg, unit)
    label = f"unit {index}/{count} {unit.name}"
    first = True

    def report(n: int, skip: int = 0) -> None:
        nonlocal first
        if first:
            progress(n * cost, label=label, skip=skip * cost)
            first = False
        else:
            progress(n * cost, skip=skip * cost)

    return report


def _logits(chain: Chain, images: Tensor) -> Tensor:
    return run_batched(chain.fp.module, images, chain.batch_size, chain.device, torch.float32)


def _fisher(chain: Chain, rest: UnitPlan, fp_logits: Tensor) -> Tensor:
    """BRECQ's Fisher diagonal at the unit output: |∂KL(p_fp ‖ p_q)/∂z| + 1, through the
    quantized rest of the network as it stands."""
    head = unit_module(chain.qg, rest[0].segment)
    tail = [unit_module(chain.qg, step.segment) for step in rest[1:]]
    grads = []
    for i in range(0, chain.q.shape[0], chain.batch_size):
        with torch.no_grad():
            z = head(chain.q[i : i + chain.batch_size].to(chain.device, torch.float32))
        z.requires_grad_(True)
        out = z
        for m in tail:
            out = m(out)
        target = F.softmax(fp_logits[i : i + chain.batch_size].to(chain.device), dim=1)
        loss = F.kl_div(F.log_softmax(out, dim=1), target, reduction="batchmean")
        (g,) = torch.autograd.grad(loss, z)
        grads.append(g.abs().add(1.0).to("cpu", chain.dtype))
    return torch.cat(grads)


# ------------------------------------------------------------------------ budget and cost


def within_budget(
    qg: QuantGraph, s: ReconSettings, images: int, plan: UnitPlan | None = None
) -> ReconSettings:
    """The settings with `iters` lowered to fit `budget` (at least 10 steps a unit), for the
    units of `plan` (default: the plan of `s.granularity`)."""
    if not s.budget:
        return s
    plan = plan if plan is not None else unit_plan(qg, s.granularity)
    per_step = plan_cost(qg, plan) * 1e3 * min(s.batch_size, images)
    fit = int(s.budget * 1e9 / per_step)
    return replace(s, iters=max(min(s.iters, fit), 10))


def plan_cost(qg: QuantGraph, plan: UnitPlan) -> int:
    """One iteration of every unit of the plan, in `unit_cost` units."""
    return sum(unit_cost(qg, u) for step in plan for u in step.units)


def unit_cost(qg: QuantGraph, unit: Unit) -> int:
    """Progress weight of one iteration of a unit: the activation elements its nodes produce
    per image, in thousands (at least 1); a step's time grows with them."""
    nodes = {n.name: n for n in qg.module.graph.nodes}
    total = 0
    for name in unit.nodes:
        meta = nodes[name].meta.get("tensor_meta") if name in nodes else None
        if meta is not None and hasattr(meta, "shape"):
            total += math.prod(meta.shape[1:])
    return max(1, round(total / 1000))


def init_ranges(qg: QuantGraph, images: Tensor, s: ReconSettings) -> None:
    """The starting point every unit is tuned from: weight and activation ranges."""
    set_weight_ranges(qg, s.range_method)
    set_activation_ranges(qg, images.split(s.batch_size), s.range_method)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe_units(qg: QuantGraph, plan: UnitPlan | str) -> list[dict[str, Any]]:
    """What `--show-units` prints: every unit to tune, in order (a plan or a granularity)."""
    if isinstance(plan, str):
        plan = unit_plan(qg, plan)
    rows = []
    for step in plan:
        for u in step.units:
            shape = _output_shape(qg, u)
            rows.append({"unit": u.name, "layers": len(u.layers), "output": shape})
    return rows


def _output_shape(qg: QuantGraph, unit: Unit) -> list[int] | None:
    node = next(n for n in qg.module.graph.nodes if n.name == unit.output)
    meta = node.meta.get("tensor_meta")
    return list(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None
