"""BN tuning and bias tuning: per-channel statistics corrections usable after any method.

Quantization shifts the mean (and scales the spread) of each conv's output channels; the
following layers were trained for the float statistics. Both corrections walk the network in
order, so each layer is corrected for the errors of the already-corrected layers before it:
- BN tuning re-estimates each quantized conv's per-channel mean and std on the calibration
  images and refolds them so they match the float network's (W' = W·σ_fp/σ_q with the weight
  step size scaled alike, so the integer weights stay put; b' = (b − μ_q)·σ_fp/σ_q + μ_fp).
  The float network's statistics on the same images stand in for the folded BatchNorm's γ, β,
  which they estimate, and work for convs that never had a BatchNorm.
- bias tuning corrects the mean only (b' = b − (μ_q − μ_fp)), for convs and linears.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from qcli.methods.chain import Chain, unit_plan
from qcli.quant.capture import QuantGraph
from qcli.quant.modules import QConv2d, QLinear
from qcli.quant.partition import Unit, prefix_unit, unit_module

Progress = Callable[[int], None]
MIN_STD = 1e-6  # below this a channel is dead: its spread is left alone


class ChannelStats:
    """Running per-channel mean and std over images and positions of (N, C, ...) batches."""

    def __init__(self) -> None:
        self.total: Tensor | float = 0.0
        self.sq: Tensor | float = 0.0
        self.count = 0

    def update(self, y: Tensor) -> None:
        y = y.transpose(0, 1).reshape(y.shape[1], -1).double()
        self.total = self.total + y.sum(1)
        self.sq = self.sq + y.pow(2).sum(1)
        self.count += y.shape[1]

    def result(self) -> tuple[Tensor, Tensor]:
        mean = self.total / self.count
        var = (self.sq / self.count - mean.pow(2)).clamp(min=0)
        return mean.float(), var.sqrt().float()


@torch.no_grad()
def _layer_stats(
    chain: Chain, segment: Unit, unit: Unit, layer: nn.Module, quantized: bool
) -> tuple[Tensor, Tensor]:
    """Statistics of a layer's raw output (before its activation) over all images."""
    graph = chain.qg if quantized else chain.fp
    prefix = prefix_unit(graph, segment, unit.input)
    pre = unit_module(graph, prefix) if prefix is not None else None
    source = chain.q if quantized else chain.f
    stats = ChannelStats()
    for i in range(0, source.shape[0], chain.batch_size):
        x = source[i : i + chain.batch_size].to(chain.device, torch.float32)
        stats.update(layer(pre(x) if pre is not None else x))
    return stats.result()


@torch.no_grad()
def correct_layer(
    layer: QConv2d | QLinear,
    q_stats: tuple[Tensor, Tensor],
    fp_stats: tuple[Tensor, Tensor],
    match_std: bool,
) -> None:
    """Refold per-channel statistics into the layer (see the module docstring)."""
    (mq, sq), (mf, sf) = q_stats, fp_stats
    ratio = torch.ones_like(sq)
    if match_std:
        alive = (sq > MIN_STD) & (sf > MIN_STD)
        ratio = torch.where(alive, sf / sq.clamp(min=MIN_STD), ratio)
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        layer.weight.mul_(ratio.reshape(shape))
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.scale.mul_(ratio.reshape(layer.weight_quantizer.scale.shape))
    layer.bias.copy_((layer.bias - mq) * ratio + mf)


def tune_statistics(
    qg: QuantGraph,
    reference: QuantGraph,
    images: Tensor,
    match_std: bool,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> int:
    """BN tuning (match_std) or bias tuning over every layer in order; returns layers tuned.

    `reference` is the float model (`float_twin` of the graph before any method ran).
    """
    chain = Chain.start(qg, images, batch_size, torch.float32, reference)
    mods = dict(qg.module.named_modules())
    fp_mods = dict(chain.fp.module.named_modules())
    tuned = 0
    for step in unit_plan(qg, "layer"):
        seg = step.segment
        for unit in step.units:
            (name,) = unit.layers
            layer = mods[name]
            if layer.bias is None or (match_std and not isinstance(layer, QConv2d)):
                continue  # (capture gives every folded conv a bias)
            q_stats = _layer_stats(chain, seg, unit, layer, quantized=True)
            fp_stats = _layer_stats(chain, seg, unit, fp_mods[name], quantized=False)
            correct_layer(layer, q_stats, fp_stats, match_std)
            tuned += 1
        chain.advance(seg)
        if progress:
            progress(1)
    return tuned
