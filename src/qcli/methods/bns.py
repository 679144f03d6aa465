"""Data-free calibration images: BatchNorm-statistics matching (ZeroQ-style) and plain noise.

`bns` optimizes random images so that every BatchNorm layer sees, at its input, the per-channel
mean and std it stored during training; each batch is matched on its own statistics (the
ZeroQ baseline), so memory is bounded by one batch. DGH (aggregated statistics, augmentations,
an output loss) is built from the same pieces: `BNInputMoments`, `bn_stat_loss`,
`init_images` and `clamp_to_pixels_` (see `dgh.py`).

Images live in the model's normalized input space, as the model consumes them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from qcli.errors import QcliError, UsageError
from qcli.methods.registry import register_data

EPS = 1e-6  # inside sqrt(var + EPS): keeps the std's gradient finite for dead channels
Progress = Callable[[int], None]
Moments = tuple[Tensor, Tensor]  # per-channel (E[x], E[x^2]) of one layer's input


class InputSpecLike(Protocol):
    size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]


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


# ---------------------------------------------------------------- settings and model state


def validate_settings(settings: BnsSettings, *, iters: bool = True) -> None:
    """Refuse settings that cannot produce images, naming the CLI flag at fault."""
    if settings.num_images <= 0:
        raise UsageError(f"--num-images must be positive, got {settings.num_images}")
    if settings.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {settings.batch_size}")
    if settings.batch_size > settings.num_images:
        raise UsageError(
            f"--batch-size ({settings.batch_size}) must not exceed "
            f"--num-images ({settings.num_images})"
        )
    if iters and settings.iters <= 0:
        raise UsageError(f"--iters must be positive, got {settings.iters}")
    if iters and not settings.lr > 0:
        raise UsageError(f"--lr must be positive, got {settings.lr}")


def batch_sizes(num_images: int, batch_size: int) -> list[int]:
    """Full batches, then the remainder (the last batch is short when N % B != 0)."""
    full, rest = divmod(num_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


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


# ---------------------------------------------------------------- BN statistics


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Every BatchNorm2d (timm's BatchNormAct2d included) that holds running statistics."""
    return [
        m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
    ]


def require_bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """`bn_layers`, refusing a model with none: its statistics are what the generators match."""
    layers = bn_layers(model)
    if not layers:
        raise QcliError(
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


# ---------------------------------------------------------------- images


def pixel_bounds(input_spec: InputSpecLike, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalized images of pixel values 0 and 1, per channel, shaped [1, C, 1, 1]."""
    mean = torch.tensor(input_spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(input_spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


@torch.no_grad()
def clamp_to_pixels_(x: Tensor, bounds: tuple[Tensor, Tensor]) -> Tensor:
    """Clamp in place to the valid pixel range; no autograd node, so gradients pass through."""
    return x.clamp_(min=bounds[0], max=bounds[1])


def init_images(n: int, input_spec: InputSpecLike, generator: torch.Generator) -> Tensor:
    """N(0,1) in normalized space, drawn on the CPU so a seed gives the same start anywhere."""
    h, w = input_spec.size
    return torch.randn(n, len(input_spec.mean), h, w, generator=generator)


# ---------------------------------------------------------------- methods


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
    validate_settings(settings)
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


class StepCounter:
    """Counts optimization steps and reports the running total to `progress`."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done)


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


def generate_noise(
    model: nn.Module,
    input_spec: InputSpecLike,
    settings: BnsSettings,
    progress: Progress | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Gaussian N(0,1) images in normalized space, clamped to valid pixels: the weakest baseline.

    Drawn batch by batch from the same seeded stream as `bns`'s starting images, so `noise`
    is exactly where `bns` starts. `progress(k)` gets the batches done, out of ceil(N / B).
    The model is unused; the argument keeps the registry's signature.
    """
    validate_settings(settings, iters=False)
    start = time.perf_counter()
    bounds = pixel_bounds(input_spec, torch.device("cpu"))
    generator = torch.Generator().manual_seed(settings.seed)
    images = []
    for k, n in enumerate(batch_sizes(settings.num_images, settings.batch_size), 1):
        images.append(clamp_to_pixels_(init_images(n, input_spec, generator), bounds))
        if progress is not None:
            progress(k)
    return torch.cat(images), {"seconds": time.perf_counter() - start}


def total_steps(settings: BnsSettings) -> int:
    """The `progress` total of `generate_bns`: ceil(N / B) * iters."""
    return math.ceil(settings.num_images / settings.batch_size) * settings.iters


register_data("bns", "per-batch BatchNorm-statistics matching (ZeroQ-style)")(generate_bns)
register_data("noise", "Gaussian noise clamped to valid pixels (no model statistics)")(
    generate_noise
)
