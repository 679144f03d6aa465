"""Give the full int8 weight grid back to the few layers that need it.

Under `--int8-range safe` every 8-bit weight grid that onnxruntime adds in int16 pairs starts
narrowed to ±64 (`quant.grid.resolve_specs`): fast u8×s8 kernels, exact on every CPU.
A few layers lose accuracy from that (on EfficientNet-Lite0 the stem and the first
projections). This pass widens them back to the full grid, which the exporter stores as uint8
weights (u8×u8 kernels: exact everywhere too, about half the speed for that layer).

Layers are ranked by how far widening each one alone moves the model's output (KL divergence
on a few calibration images) per multiply-add, and widened while their multiply-adds stay
within `mac_share` of the model's, which bounds the latency cost. The pass decides, it does
not change the graph: it returns the plan with those layers widened (`QuantPlan.widened`),
which `apply_widened` gives the graph through the grid resolver, ranges set afresh.

Measuring that KL with one forward per layer made the pass cost layers × model (ResNet-50's
calibrate: 268 s on 2 shared cores, now 34 s; benchmarks/calib_time.md). It is estimated
instead for every layer at once, in one forward and a few backward passes: widening changes
a layer's output by Δy = f(x; ΔW, Δb) (conv and linear are linear in their weights), and
KL ≈ ½ Δzᵀ F Δz with Δz ≈ J Δy the logits' change and F = diag(p) − ppᵀ the softmax's
Fisher. For v = F^½ r, r a random ±1 vector per image, E[(vᵀ J Δy)²] = Δzᵀ F Δz, and vᵀJ is
one backward pass of vᵀz for all layers together.
The few layers the estimate ranks first are then measured exactly (`exact` forwards). On
EfficientNet-Lite0 the chosen layers overlap the exact pass's in 7 of 10 (calib_time.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qcli.methods.second_order import EstimateSettings, output_kl
from qcli.quant.capture import QuantGraph, apply_plan
from qcli.quant.modules import QConv2d, QLinear
from qcli.quant.plan import WEIGHT_SUFFIX, QuantPlan
from qcli.quant.ranges import weight_qparams


@dataclass(frozen=True)
class WidenSettings:
    # The share of multiply-adds allowed on the slower u8×u8 kernels. EfficientNet-Lite0,
    # data-free W8A8 (`quantize --bits 8`), 400 held-out images, FP 88.75, seeds 0 / 1:
    # 0.10 -> 88.25 / 88.00, 0.20 -> 88.25 / 88.25, 0.30 -> 88.75 / 89.00; onnxruntime
    # batch-1 latency (1 thread) x1.05 and x1.13 of 0.10's. 0.20: within half a point of FP
    # on both seeds for 5% latency.
    mac_share: float = 0.20
    probe_images: int = 16
    min_kl: float = 1e-5  # widening that moves the output less than this is not worth it
    draws: int = 2  # random projections of the Fisher (backward passes) per image
    exact: int = 2  # layers ranked first whose KL is then measured with a forward each
    batch: int = 8  # images per forward of the estimate (bounds its autograd memory)
    seed: int = 0


def narrowed_layers(qg: QuantGraph) -> list[tuple[str, QConv2d | QLinear]]:
    return [
        (n, layer)
        for n, layer in qg.layers()
        if layer.weight_quantizer is not None and layer.weight_quantizer.spec.limit is not None
    ]


def widen_sensitive_layers(
    qg: QuantGraph, images: Tensor, weight_method: str, settings: WidenSettings = WidenSettings()
) -> tuple[QuantPlan, dict[str, Any]]:
    """Choose the narrowed layers worth widening: returns the graph's plan with them widened
    and what was measured and chosen. The graph is left as it was (`apply_widened`)."""
    cands = narrowed_layers(qg)
    if not cands:
        return qg.base_plan, {"widened": []}
    device = next(qg.module.parameters()).device
    x = images[: settings.probe_images].to(device)
    macs = qg.layer_macs(x)
    kl = estimate_kl(qg, x, cands, weight_method, settings)
    per_mac = lambda n: kl[n] / max(macs[n], 1)  # noqa: E731
    exact = sorted(kl, key=per_mac, reverse=True)[: settings.exact]
    with torch.no_grad():
        if exact:
            base = F.log_softmax(qg(x).float(), 1)
        for name in exact:
            with widened(qg, [name], weight_method):
                out = F.log_softmax(qg(x).float(), 1)
            kl[name] = float(F.kl_div(base, out, log_target=True, reduction="batchmean"))
    total = sum(macs.values())
    budget = settings.mac_share * total
    chosen, spent = [], 0
    for name in sorted(kl, key=per_mac, reverse=True):
        if kl[name] >= settings.min_kl and spent + macs[name] <= budget:
            chosen.append(name)
            spent += macs[name]
    return qg.base_plan.widened(chosen), {
        "widened": chosen,
        "mac_share": round(spent / total, 4) if total else 0.0,
        "mac_budget": settings.mac_share,
        "kl_measured": exact,  # the rest of kl_if_widened are second-order estimates
        "kl_if_widened": {n: round(v, 6) for n, v in sorted(kl.items(), key=lambda kv: -kv[1])},
    }


def apply_widened(qg: QuantGraph, plan: QuantPlan, weight_method: str) -> list[str]:
    """Give the graph `plan` (its widened layers) through the grid resolver and set the
    ranges of every weight quantizer whose grid changed afresh, with `weight_method`;
    returns those quantizers' names."""
    layers = dict(qg.layers())
    changed = apply_plan(qg, plan)
    with torch.no_grad():
        for name in changed:
            if not name.endswith(WEIGHT_SUFFIX):
                raise ValueError(f"{name}: widening regrids weights only")
            layer = layers[name.removesuffix(WEIGHT_SUFFIX)]
            wq = layer.weight_quantizer
            wq.set_qparams(*weight_qparams(layer.weight, wq.spec, weight_method))
    return changed


@contextmanager
def widened(qg: QuantGraph, layers: Iterable[str], weight_method: str) -> Iterator[None]:
    """The graph with `layers` widened inside, exactly as it was after (plan, grids, ranges):
    what the measurements try, without keeping."""
    before, layers = qg.base_plan, tuple(layers)
    quantizers = dict(qg.quantizers())
    keys = [layer + WEIGHT_SUFFIX for layer in layers]
    saved = {
        k: (quantizers[k].scale.detach().clone(), quantizers[k].zero_point.clone()) for k in keys
    }
    try:
        apply_widened(qg, before.widened(layers), weight_method)
        yield
    finally:
        apply_plan(qg, before)
        with torch.no_grad():
            for k, (scale, zp) in saved.items():
                quantizers[k].set_qparams(scale, zp)


def estimate_kl(
    qg: QuantGraph,
    x: Tensor,
    cands: list[tuple[str, QConv2d | QLinear]],
    weight_method: str,
    settings: WidenSettings = WidenSettings(),
) -> dict[str, float]:
    """Second-order estimate of KL(output narrowed ‖ output with one layer widened) for every
    candidate at once: one forward and `draws` backward passes per batch (module docstring)."""
    delta = {}  # widened minus narrowed (fake-quantized) weight and bias of each candidate
    with torch.no_grad():
        for name, layer in cands:
            w0, b0 = layer.quantized_weight(), layer.quantized_bias()
            with widened(qg, [name], weight_method):
                w1, b1 = layer.quantized_weight(), layer.quantized_bias()
            delta[name] = (w1 - w0, None if b0 is None else b1 - b0)
    sites = {name: (layer, _change(*delta[name])) for name, layer in cands}
    est = EstimateSettings(batch=settings.batch, draws=settings.draws, seed=settings.seed)
    return output_kl(qg, x, sites, est)


def _change(dw: Tensor, db: Tensor | None):
    """A candidate's output change: the layer applied to the weight and bias changes."""
    return lambda layer, args, y: layer.with_weights(args[0], dw, db)
