"""Give the full int8 weight grid back to the few layers that need it.

Under `--int8-range safe` every 8-bit weight grid that onnxruntime adds in int16 pairs starts
narrowed to ±64 (`quant.capture.safe_weight_spec`): fast u8×s8 kernels, exact on every CPU.
A few layers lose accuracy from that (on EfficientNet-Lite0 the stem and the first
projections). This pass widens them back to the full grid, which the exporter stores as uint8
weights (u8×u8 kernels: exact everywhere too, about half the speed for that layer).

Layers are ranked by how far widening each one alone moves the model's output (KL divergence
on a few calibration images) per multiply-add, and widened while their multiply-adds stay
within `mac_share` of the model's, which bounds the latency cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qcli.quant.capture import QuantGraph
from qcli.quant.modules import QConv2d, QLinear
from qcli.quant.ranges import weight_qparams
from qcli.quant.spec import weight_spec


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


def narrowed_layers(qg: QuantGraph) -> list[tuple[str, QConv2d | QLinear]]:
    return [
        (n, layer)
        for n, layer in qg.layers()
        if layer.weight_quantizer is not None and layer.weight_quantizer.spec.limit is not None
    ]


@torch.no_grad()
def widen_sensitive_layers(
    qg: QuantGraph, images: Tensor, weight_method: str, settings: WidenSettings = WidenSettings()
) -> dict[str, Any]:
    """Widen the narrowed layers worth it; returns what was measured and chosen."""
    cands = narrowed_layers(qg)
    if not cands:
        return {"widened": []}
    device = next(qg.module.parameters()).device
    x = images[: settings.probe_images].to(device)
    macs = qg.layer_macs(x)
    base = F.log_softmax(qg(x).float(), 1)
    kl: dict[str, float] = {}
    for name, layer in cands:
        undo = _widen(layer, weight_method)
        out = F.log_softmax(qg(x).float(), 1)
        kl[name] = float(F.kl_div(base, out, log_target=True, reduction="batchmean"))
        undo()
    total = sum(macs.values())
    budget = settings.mac_share * total
    ranked = sorted(kl, key=lambda n: kl[n] / max(macs[n], 1), reverse=True)
    chosen, spent = [], 0
    for name in ranked:
        if kl[name] >= settings.min_kl and spent + macs[name] <= budget:
            chosen.append(name)
            spent += macs[name]
    layers = dict(cands)
    for name in chosen:
        _widen(layers[name], weight_method)
    return {
        "widened": chosen,
        "mac_share": round(spent / total, 4) if total else 0.0,
        "mac_budget": settings.mac_share,
        "kl_if_widened": {n: round(v, 6) for n, v in sorted(kl.items(), key=lambda kv: -kv[1])},
    }


def _widen(layer: QConv2d | QLinear, weight_method: str):
    """Give `layer` the full grid with freshly set ranges; returns a function that undoes it."""
    wq = layer.weight_quantizer
    spec, scale, zp = wq.spec, wq.scale.detach().clone(), wq.zero_point.clone()
    wq.spec = weight_spec(spec.bits)
    wq.set_qparams(*weight_qparams(layer.weight, wq.spec, weight_method))

    def undo() -> None:
        wq.spec = spec
        wq.set_qparams(scale, zp)

    return undo
