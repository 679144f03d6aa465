"""The BatchNorm-statistics library the BN-matching generators (bns, dgh) are built from.

Forward pre-hooks record the per-channel raw moments (E[x], E[x^2]) of every BN layer's input;
the loss compares their mean and std with the stored running statistics. `SetMoments` caches
each batch's moments so a loss can use the statistics of a whole image set while only one
batch is differentiable; `set_bn_loss` is the yardstick every generator is scored with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qcli.errors import QcliError

EPS = 1e-6  # inside sqrt(var + EPS): keeps the std's gradient finite for dead channels
Moments = tuple[Tensor, Tensor]  # per-channel (E[x], E[x^2]) of one layer's input


def model_device(model: nn.Module) -> torch.device:
    """Where the model lives, so generation runs on its GPU when it has one."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BN uses running stats, none are updated) and no parameter gradients.

    Only the images are optimized, so freezing parameters also skips computing weight
    gradients in every backward pass. Training flags and `requires_grad` are restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Every BatchNorm2d (timm's BatchNormAct2d included) that holds running statistics."""
    return [
        m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
    ]


class NoBatchNormError(QcliError):
    """The model has no BatchNorm statistics to generate images from (a ViT, a ConvNeXt)."""


def require_bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """`bn_layers`, refusing a model with none: its statistics are what the generators match."""
    layers = bn_layers(model)
    if not layers:
        raise NoBatchNormError(
            "model has no BatchNorm layers, so BN-statistics data generation cannot work; "
            "use --method noise or pass real images with --data"
        )
    return layers


def channel_moments(x: Tensor) -> Moments:
    """Per-channel first and second raw moments of an NCHW tensor over batch and space.

    Raw moments are what DGH averages over batches. The hand-written backward is one fused
    pass, (g_mean + 2 x g_sq) / n: autograd's own backward of mean(x) and mean(x^2) took
    several full-size passes and made the hooks ~40% of a step on EfficientNet-Lite0.
    """
    return _ChannelMoments.apply(x)


class _ChannelMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Moments:
        ctx.save_for_backward(x)  # BN keeps its input for its own backward: no extra memory
        return x.mean(dim=(0, 2, 3)), x.square().mean(dim=(0, 2, 3))

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor, grad_sq: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        shape = (1, -1, 1, 1)
        return torch.addcmul((grad_mean / n).view(shape), x, (2 * grad_sq / n).view(shape))


class BNInputMoments:
    """Forward pre-hooks recording the input moments of each BN layer, by layer index.

    Moments are reduced inside the hook, so nothing beyond what autograd already keeps stays
    alive. `moments[i]` is None for a layer the last forward did not reach (an unused head).
    Use as a context manager so the hooks are always removed.
    """

    def __init__(self, layers: Sequence[nn.BatchNorm2d]) -> None:
        self.moments: list[Moments | None] = [None] * len(layers)
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            self.moments[index] = channel_moments(args[0])

        return hook

    def clear(self) -> None:
        self.moments = [None] * len(self.moments)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> BNInputMoments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def bn_targets(layers: Sequence[nn.BatchNorm2d], device: torch.device) -> list[Moments]:
    """The stored (mean, std) of every layer, std = sqrt(running_var), as float32 constants."""
    return [
        (
            layer.running_mean.detach().to(device, torch.float32),
            layer.running_var.detach().to(device, torch.float32).sqrt(),
        )
        for layer in layers
    ]


def moments_std(mean: Tensor, mean_sq: Tensor) -> Tensor:
    """sqrt(E[x^2] - E[x]^2 + EPS); rounding can make the variance slightly negative."""
    return torch.sqrt((mean_sq - mean.square()).clamp_min(0) + EPS)


def layer_stat_loss(
    mean: Tensor, mean_sq: Tensor, target_mean: Tensor, target_std: Tensor
) -> Tensor:
    """(||mean - mu||^2 + ||std - sigma||^2) / C for one layer, from raw moments."""
    std = moments_std(mean, mean_sq)
    return ((mean - target_mean).square().sum() + (std - target_std).square().sum()) / mean.numel()


def bn_stat_loss(moments: Sequence[Moments | None], targets: Sequence[Moments]) -> Tensor:
    """Mean of `layer_stat_loss` over the layers the forward reached (DGH's AVERAGE weights)."""
    losses = [
        layer_stat_loss(m[0], m[1], t[0], t[1])
        for m, t in zip(moments, targets, strict=True)
        if m is not None
    ]
    if not losses:
        raise QcliError("no BatchNorm layer was reached by the forward pass")
    return torch.stack(losses).mean()


@contextmanager
def channels_last_on_cpu(model: nn.Module, device: torch.device) -> Iterator[torch.memory_format]:
    """Run a CPU model in channels_last, then give its weights back their own layout.

    Measured with one thread, a whole step (forward, backward, Adam) took ~8% less on
    ResNet-20 at 32x32 and ~15% less on EfficientNet-Lite0 at 224. Not measured on CUDA,
    so a GPU model is left as it is. Values are untouched: only strides change.
    """
    if device.type != "cpu":
        yield torch.contiguous_format
        return
    convs = [p for p in model.parameters() if p.dim() == 4]
    was_cl = bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        if not was_cl:
            model.to(memory_format=torch.contiguous_format)


class SetMoments:
    """Cached per-channel raw moments of every batch, combined into statistics of the set.

    Batch b contributes with weight n_b / N (its share of the elements), so a short last
    batch counts for what it holds. The std comes from the aggregated second moment, never
    from averaging per-batch stds.
    """

    def __init__(self, sizes: Sequence[int], layers: int, device: torch.device) -> None:
        self.weights = torch.tensor(sizes, dtype=torch.float32, device=device) / sum(sizes)
        self.mean: list[Tensor | None] = [None] * layers  # [num_batches, C] per layer
        self.mean_sq: list[Tensor | None] = [None] * layers

    @torch.no_grad()
    def store(self, b: int, moments: Sequence[Moments | None]) -> None:
        for i, m in enumerate(moments):
            if m is None:
                continue
            if self.mean[i] is None:
                shape = (len(self.weights), m[0].numel())
                self.mean[i] = m[0].new_zeros(shape)
                self.mean_sq[i] = m[0].new_zeros(shape)
            self.mean[i][b] = m[0]
            self.mean_sq[i][b] = m[1]

    def combine(self, b: int, moments: Sequence[Moments | None]) -> list[Moments | None]:
        """The set's moments with batch b's cached ones replaced by `moments` (with grad)."""
        return [
            None if m is None or self.mean[i] is None else self._swap(b, i, m)
            for i, m in enumerate(moments)
        ]

    def total(self) -> list[Moments | None]:
        """The set's moments from the cache alone."""
        return [
            None if mean is None else (self.weights @ mean, self.weights @ sq)
            for mean, sq in zip(self.mean, self.mean_sq, strict=True)
        ]

    def _swap(self, b: int, i: int, m: Moments) -> Moments:
        w = self.weights[b]
        mean, sq = self.mean[i], self.mean_sq[i]
        assert mean is not None and sq is not None
        return (
            self.weights @ mean - w * mean[b] + w * m[0],
            self.weights @ sq - w * sq[b] + w * m[1],
        )


@torch.no_grad()
def set_moments(
    model: nn.Module, hooks: BNInputMoments, views: Iterable[Tensor], sizes: Sequence[int]
) -> SetMoments:
    """Forward each batch (no grad) and cache its moments: the set's statistics, exactly."""
    cache = SetMoments(sizes, len(hooks.moments), model_device(model))
    for b, x in enumerate(views):
        hooks.clear()
        model(x)
        cache.store(b, hooks.moments)
    hooks.clear()
    return cache


def set_bn_loss(model: nn.Module, images: Tensor, batch_size: int) -> float:
    """BN loss of the statistics of a whole image set, computed batch by batch.

    The yardstick every generator is scored with: the loss BN layers would report had
    these images been the training set.
    """
    layers = require_bn_layers(model)
    device = model_device(model)
    batches = images.split(batch_size)
    with frozen_eval(model), BNInputMoments(layers) as hooks:
        views = (x.to(device) for x in batches)
        cache = set_moments(model, hooks, views, [len(x) for x in batches])
    return float(bn_stat_loss(cache.total(), bn_targets(layers, device)))
