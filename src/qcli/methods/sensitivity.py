"""Per-quantizer sensitivity for bit allocation: what each quantizer costs the model alone.

For every candidate width, one graph is captured at that width everywhere and given MSE range
setting on the calibration images (the quick per-width calibration, as `calibrate --method mse`
sets it). Then each quantizer alone is switched on and the model's output is compared with the
float output on the same images: KL(float || quantized) (the degradation the program sums) and
the confidence lost on the float top-1 class (the drop a `--max-drop` budget sums; `Scores`).
Layer costs come along: weights per layer and multiply-adds per image. A kind of quantizer with
a single candidate width (say `--act-bits 8`) has no choice to make and is not measured: its
degradation is recorded as 0, which shifts every allocation's predicted sum alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcli.methods.bit_allocation import Unit
from qcli.methods.range_setting import fit_bias_grids, set_activation_ranges, set_weight_ranges
from qcli.methods.second_order import EstimateSettings, output_kl
from qcli.quant.capture import QuantGraph, capture
from qcli.quant.plan import QuantPlan
from qcli.quant.quantizer import Quantizer, QuantMode, quant_mode


@dataclass(frozen=True)
class Scores:
    """How far a quantized output is from the float output, over the same images."""

    kl: float  # KL(float || quantized), batch mean, in nats
    flips_pct: float  # images whose top-1 class differs from the float model's, in percent
    # Confidence lost on the float top-1 class, 100 · mean max(0, p_float(c) - p_quant(c)):
    # the drop a `--max-drop` budget sums. Flips come in steps of one image (3% of 32), so a
    # layer that moves no decision on few images would look free; this moves smoothly.
    lost_pct: float = 0.0


@torch.no_grad()
def score(logits: Tensor, fp_log_probs: Tensor, fp_top: Tensor) -> Scores:
    logp = F.log_softmax(logits.float(), 1)
    kl = float(F.kl_div(logp, fp_log_probs, log_target=True, reduction="batchmean"))
    flips = float((logp.argmax(1) != fp_top).float().mean()) * 100
    idx = fp_top[:, None]
    lost = (fp_log_probs.gather(1, idx).exp() - logp.gather(1, idx).exp()).clamp(min=0)
    return Scores(max(kl, 0.0), flips, float(lost.mean()) * 100)


def calibrated_graph(
    model: nn.Module, shape: tuple[int, ...], plan: QuantPlan, images: Tensor, batch: int
) -> QuantGraph:
    """Capture `plan` and set its ranges with MSE: the quick calibration that sensitivity and
    the check of an allocation both use."""
    qg = capture(model, shape, plan)
    qg.to(images.device)
    set_weight_ranges(qg, "mse")
    set_activation_ranges(qg, images.split(batch), "mse")
    fit_bias_grids(qg)
    return qg


@torch.no_grad()
def _forward(qg: QuantGraph, images: Tensor, batch: int) -> Tensor:
    return torch.cat([qg(x) for x in images.split(batch)])


@torch.no_grad()
def measure_plan(
    model: nn.Module, shape: tuple[int, ...], plan: QuantPlan, images: Tensor, batch: int
) -> Scores:
    """The whole plan's measured degradation: what the additive prediction is checked against."""
    qg = calibrated_graph(model, shape, plan, images, batch)
    fp_logp, fp_top = _float_reference(qg, images, batch)
    return score(_forward(qg, images, batch), fp_logp, fp_top)


def _float_reference(qg: QuantGraph, images: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    with quant_mode(qg.select(), QuantMode.OFF):
        logp = F.log_softmax(_forward(qg, images, batch).float(), 1)
    return logp, logp.argmax(1)


SENSITIVITY_MODES = ("measure", "estimate")


def sensitivity_units(
    model: nn.Module,
    shape: tuple[int, ...],
    base: QuantPlan,
    weight_bits: Sequence[int],
    act_bits: Sequence[int],
    images: Tensor,
    batch: int = 64,
    progress: Callable[[int], None] | None = None,
    mode: str = "measure",
    estimate: EstimateSettings | None = None,
) -> list[Unit]:
    """One Unit per weight and activation quantizer, with its degradation at every width.

    `base` gives everything but the widths (kept layers, int8 range, signedness). "measure"
    runs the model once per quantizer and width, and also scores the confidence lost (for
    drop budgets); "estimate" gives the KL of all quantizers of a width from one forward and
    `estimate.draws` backward passes per batch (`second_order.output_kl`), with no drop.
    Progress advances once per quantizer and width measured, or once per width estimated.
    """
    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"sensitivity mode must be one of {SENSITIVITY_MODES}, not {mode!r}")
    measured_w = len(set(weight_bits)) > 1
    measured_a = len(set(act_bits)) > 1
    widths = sorted(set(weight_bits if measured_w else ()) | set(act_bits if measured_a else ()))
    widths = widths or [max(weight_bits)]  # costs are still needed
    scores: dict[tuple[str, int], Scores] = {}
    layers: dict[str, tuple[int, int, str | None]] = {}  # params, macs, input unit
    acts: list[str] = []
    for b in widths:
        plan = replace(base, weight_bits=b, act_bits=b, weights=(), activations=(), specs=())
        qg = calibrated_graph(model, shape, plan, images, batch)
        if not layers:
            layers = _layer_costs(qg, images[:1])
            acts = [n for n, _ in qg.act_quantizers()]
        todo = {}  # unit name -> its quantizer, for the quantizers with a choice at width b
        for name, q in qg.quantizers():
            is_weight = name.endswith(".weight_quantizer")
            chosen = measured_w if is_weight else measured_a
            if chosen and b in (weight_bits if is_weight else act_bits):
                todo[name.removesuffix(".weight_quantizer") if is_weight else name] = q
        if mode == "measure":
            for unit, s in _measured(qg, todo, images, batch, progress):
                scores[unit, b] = s
        else:
            for unit, kl in _estimated(qg, todo, images, estimate or EstimateSettings()).items():
                scores[unit, b] = Scores(kl, float("nan"))
            if progress:
                progress(1)
    zero = Scores(0.0, 0.0)

    def degradations(name: str, bits: tuple[int, ...]) -> tuple[tuple, tuple]:
        kl = tuple(scores.get((name, b), zero).kl for b in bits)
        lost = tuple(scores.get((name, b), zero).lost_pct for b in bits)
        return kl, lost if mode == "measure" else ()

    units = []
    wb, ab = tuple(sorted(weight_bits)), tuple(sorted(act_bits))
    for name, (params, macs, src) in layers.items():
        kl, lost = degradations(name, wb)
        units.append(Unit(name, "weight", wb, kl, lost, params=params, macs=macs, input_unit=src))
    for name in acts:
        units.append(Unit(name, "act", ab, *degradations(name, ab)))
    return units


@torch.no_grad()
def _measured(
    qg: QuantGraph,
    todo: dict[str, Quantizer],
    images: Tensor,
    batch: int,
    progress: Callable[[int], None] | None,
) -> Iterator[tuple[str, Scores]]:
    """Each quantizer alone switched on, the model run and scored against the float output."""
    fp_logp, fp_top = _float_reference(qg, images, batch)
    for unit, q in todo.items():
        with quant_mode(qg.select(), QuantMode.OFF), quant_mode([q], QuantMode.QUANTIZE):
            yield unit, score(_forward(qg, images, batch), fp_logp, fp_top)
        if progress:
            progress(1)


def _estimated(
    qg: QuantGraph, todo: dict[str, Quantizer], images: Tensor, settings: EstimateSettings
) -> dict[str, float]:
    """Every quantizer's KL at once, around the float model: a layer's output changes by the
    layer applied to (quantized − float) weights, an activation by (quantized − float)."""
    layers = dict(qg.layers())
    sites = {
        unit: (layers[unit], _weight_change(layers[unit], q))
        if unit in layers
        else (q, _activation_change)
        for unit, q in todo.items()
    }
    with quant_mode(qg.select(), QuantMode.OFF):
        return output_kl(qg, images, sites, settings)


@torch.no_grad()
def _weight_change(layer: nn.Module, wq: Quantizer):
    """The layer applied to (quantized − float) weights; the difference is taken once, not
    per batch."""
    with quant_mode([wq], QuantMode.QUANTIZE):
        dw = wq(layer.weight) - layer.weight
    return lambda m, args, y: m.with_weights(args[0], dw, None)


def _activation_change(q: nn.Module, args: tuple[Tensor, ...], y: Tensor) -> Tensor:
    with quant_mode([q], QuantMode.QUANTIZE):
        return q.forward(args[0]) - args[0]  # not q(...): that would run this hook again


def count_measurements(layers: int, acts: int, weight_bits, act_bits, mode: str = "measure") -> int:
    """Progress steps of `sensitivity_units`."""
    nw, na = len(set(weight_bits)), len(set(act_bits))
    if mode == "estimate":
        widths = (set(weight_bits) if nw > 1 else set()) | (set(act_bits) if na > 1 else set())
        return max(len(widths), 1)
    return layers * (nw if nw > 1 else 0) + acts * (na if na > 1 else 0)


@torch.no_grad()
def _layer_costs(qg: QuantGraph, x: Tensor) -> dict[str, tuple[int, int, str | None]]:
    """Per quantized layer: weights, multiply-adds per image, the activation quantizer
    feeding it (None when its input is float)."""
    q_names = {id(q): n for n, q in qg.act_quantizers()}
    macs = qg.layer_macs(x)
    out = {}
    for name, layer in qg.layers():
        if layer.weight_quantizer is None:
            continue
        iq = layer.input_quantizer
        out[name] = (layer.weight.numel(), macs[name], q_names.get(id(iq)) if iq else None)
    return out
