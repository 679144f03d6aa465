"""`bns`: BatchNorm-statistics matching per batch (the ZeroQ baseline).

Optimizes random images so that every BatchNorm layer sees, at its input, the per-channel
mean and std it stored during training; each batch is matched on its own statistics, so
memory is bounded by one batch. DGH (dgh.py) builds on the same library (bn_stats.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qcli.methods.generators.bn_stats import (
    BNInputMoments,
    Moments,
    bn_stat_loss,
    bn_targets,
    channels_last_on_cpu,
    frozen_eval,
    model_device,
    require_bn_layers,
)
from qcli.methods.generators.images import (
    InputSpecLike,
    Progress,
    StepCounter,
    batch_sizes,
    clamp_to_pixels_,
    init_images,
    pixel_bounds,
    validate_size,
    validate_steps,
)
from qcli.methods.registry import register_data


@dataclass(frozen=True)
class BnsSettings:
    num_images: int = 256
    batch_size: int = 32
    iters: int = 200
    # Adam moves each pixel by about lr per step whatever the gradient's scale, and the valid
    # range is ~4.5 units wide in normalized space: 0.2 crosses it in a few dozen steps and
    # still settles within 200. On the trained CIFAR ResNet-20 (one batch of 32, 200 iters,
    # 2 seeds) the final BN loss was 0.045 at lr 0.02, 0.018 at 0.05, 0.010 at 0.1, 0.0055 at
    # 0.2, 0.007-0.022 at 0.3 (oscillating), 0.011-0.018 at 0.5 and 0.06-0.07 at 1.0.
    lr: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        validate_size(self.num_images, self.batch_size)
        validate_steps(self.iters, self.lr)


def generate_bns(
    model: nn.Module,
    input_spec: InputSpecLike,
    settings: BnsSettings,
    progress: Progress | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Synthesize images whose per-batch BN-input statistics match the stored ones.

    Returns [N, C, H, W] float32 CPU images in normalized space and metrics. `progress(k)` is
    called after every optimization step with the steps done so far, out of
    ceil(N / B) * iters.
    """
    settings.validate()
    layers = require_bn_layers(model)
    device = model_device(model)
    targets = bn_targets(layers, device)
    bounds = pixel_bounds(input_spec, device)
    generator = torch.Generator().manual_seed(settings.seed)
    sizes = batch_sizes(settings.num_images, settings.batch_size)
    counter = StepCounter(progress)
    images, first, last = [], [], []
    start = time.perf_counter()
    with (
        frozen_eval(model),
        channels_last_on_cpu(model, device) as layout,
        BNInputMoments(layers) as hooks,
    ):
        for n in sizes:
            x = init_images(n, input_spec, generator).to(device, memory_format=layout)
            x, losses = _optimize_batch(model, x, hooks, targets, bounds, settings, counter)
            images.append(x.cpu())
            first.append(losses[0])
            last.append(losses[1])
    out = torch.cat(images).contiguous()
    metrics = {
        "initial_bn_loss": torch.stack(first).mean().item(),
        "final_bn_loss": torch.stack(last).mean().item(),
        "seconds": time.perf_counter() - start,
        "iters": settings.iters,
        "batch_size": settings.batch_size,
        "num_images": settings.num_images,
        "lr": settings.lr,
        "bn_layers": len(layers),
    }
    return out, metrics


def _optimize_batch(
    model: nn.Module,
    x: Tensor,
    hooks: BNInputMoments,
    targets: Sequence[Moments],
    bounds: tuple[Tensor, Tensor],
    settings: BnsSettings,
    counter: StepCounter,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Adam on one batch; returns the images and the (first, last) step's loss, on device."""
    x = clamp_to_pixels_(x, bounds).requires_grad_()
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    first = loss = None
    for _ in range(settings.iters):
        hooks.clear()
        model(x)
        loss = bn_stat_loss(hooks.moments, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clamp_to_pixels_(x, bounds)
        if first is None:
            first = loss.detach()
        counter.step()
    hooks.clear()
    assert first is not None and loss is not None
    return x.detach(), (first, loss.detach())


def total_steps(settings: BnsSettings) -> int:
    """The `progress` total of `generate_bns`: ceil(N / B) * iters."""
    return math.ceil(settings.num_images / settings.batch_size) * settings.iters


register_data(
    "bns", "per-batch BatchNorm-statistics matching (ZeroQ-style)", BnsSettings, total=total_steps
)(generate_bns)
