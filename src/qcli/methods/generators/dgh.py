"""DGH: data generation for hardware-friendly PTQ (Dikstein et al., WACV'25).

Three parts over `bns`, each with a switch so the ablation can remove it alone:
- `aggregate`: the BN loss compares the stored statistics with those of *all* N images. Only
  the batch being optimized is differentiable; the other batches enter through cached
  per-channel raw moments, refreshed without gradient after each of their steps. Memory for
  activations is bounded by the batch size, whatever N; between their visits the other
  batches keep their optimizer moments packed in bfloat16 (`IdleStore`), so each image
  costs its float32 (padded) pixels and as much again, not three times as much; with
  `idle_state="compact"` and Adafactor, only their pixels in float16 (`CompactStore`).
- `augment`: images carry extra border pixels and each step sees a random flip, a 3x3
  Gaussian smoothing (an image prior) and a random crop, as BN saw augmented training images.
- `output_loss`: stretch each image's logit range so the layers after the last BN see the
  spread real images give them.

Images live in the model's normalized input space.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcli.errors import UsageError
from qcli.methods.generators.bn_stats import (
    EPS,
    BNInputMoments,
    Moments,
    SetMoments,
    bn_stat_loss,
    bn_targets,
    channels_last_on_cpu,
    frozen_eval,
    model_device,
    require_bn_layers,
    set_moments,
)
from qcli.methods.generators.heap import release_free_heap
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
from qcli.methods.registry import register_data, setting

OUTPUT_LOSSES = ("minmax", "regularized")
OPTIMIZERS = {
    "radam": torch.optim.RAdam,
    "adam": torch.optim.Adam,
    "adafactor": torch.optim.Adafactor,
}
IDLE_STATES = ("moments", "compact")
SCHEDULES = ("plateau", "cosine")


@dataclass(frozen=True)
class DghSettings:
    """DGH's settings; defaults from MCT unless a comment says measured."""

    num_images: int = 256
    batch_size: int = 32
    iters: int = 200
    # RAdam damps its early steps (rectification: ~0.05 x lr at step 10, ~0.3 x at step 200),
    # which is why MCT's lr is 16 and why bns's Adam lr 0.2 crawls here. Set-level BN loss
    # at the end, lr:patience. Trained CIFAR ResNet-20, 64 images, batch 32, 200 iters:
    # 0.2 was still at 0.29 after 40 iters (16: 0.045), 4:20 0.032, 16:4 0.107, 16:10 0.037,
    # 16:20 0.012, 16:40 0.0042, 16:inf 0.068, 32:40 0.0033, 64:20 0.0047, 64:40 0.0028,
    # 64:70 0.0065, 128:40 0.0033. EfficientNet-Lite0, 16 images, from 11.6: 64 gave 6.1
    # after 60 iters, 16 gave 2.9 and 8 gave 2.4 after 40. So MCT's lr 16 (flat up to 128 on
    # ResNet-20, far better than 64 on EfficientNet), but patience iters/5, not MCT's
    # iters/50: the loss a step sees is noisy (random crop and flip), and the short patience
    # halved the lr long before the images had converged.
    lr: float = 16.0
    optimizer: str = setting(  # MCT's; "adam" (at a lr near 0.2) for short runs
        "--optimizer",
        "dgh image optimizer: radam (MCT's, with --lr 16), adam (better on short runs, "
        "e.g. --iters 50 --lr 0.15, the `quantize` preset) or adafactor (no image-sized state; "
        "what --idle-state compact needs).",
        default="radam",
        choices=tuple(OPTIMIZERS),
    )
    seed: int = 0
    aggregate: bool = setting(
        "--no-aggregate",
        "dgh ablation: match BN statistics per batch instead of over all images.",
        default=True,
        kind=bool,
        sets=False,
    )
    augment: bool = setting(
        "--no-augment",
        "dgh ablation: no random flip, crop and smoothing before each step.",
        default=True,
        kind=bool,
        sets=False,
    )
    output_loss: bool = setting(
        "--no-output-loss",
        "dgh ablation: no output-stretching loss.",
        default=True,
        kind=bool,
        sets=False,
    )
    output_kind: str = setting(  # MCT's NEGATIVE_MIN_MAX_DIFF, or "regularized"
        "--output-loss",
        "dgh output loss: minmax (default, widen the logit range) or regularized.",
        default="minmax",
        choices=OUTPUT_LOSSES,
    )
    output_weight: float = 1e-5
    # None: H // 7, i.e. 32 at 224 (MCT) and 4 at 32 (CIFAR's own pad-4 random crop)
    extra_pixels: int | None = None
    smooth_sigma: float = 1.25
    # Stronger train-view augmentation (Plug-In Inversion's, off by default): `zoom` crops a
    # random square of (1 - zoom..1) of the padded side and resizes it to the input size;
    # `color_shift` multiplies each channel by exp(U(-c, c)) and adds U(-c, c) in normalized
    # units, one draw per step.
    zoom: float = setting(
        "--zoom",
        "dgh: each step sees a random square of (1 - ZOOM..1) of the image, resized "
        "(default 0: a plain random crop).",
        default=0.0,
        kind=float,
        low=0,
        high=1,
        high_open=True,
    )
    color_shift: float = setting(
        "--color-shift",
        "dgh: each step scales each channel by exp(U(-C, C)) and shifts it by U(-C, C) "
        "(normalized units; default 0: off).",
        default=0.0,
        kind=float,
        low=0,
    )
    lr_factor: float = 0.5
    patience: int | None = None  # None: max(1, iters // 5), measured (see lr)
    min_lr: float = 1e-4
    # True: after each step, re-measure the batch's cached moments on its final view (one
    # extra forward, as MCT: ~40% of a step on ResNet-20). False: cache the moments the step
    # itself measured (augmented view, before the update), no extra pass. Same ResNet-20 runs
    # as for lr (64 images, 200 iters): set-level BN loss 0.0028 exact vs 0.0070 stale, so
    # the pass earns its time.
    exact_refresh: bool = True
    # Coarse-to-fine (DeepInversion's multi-resolution): this share of the iterations runs on
    # images at `coarse_scale` of the size (a step costs ~scale² as much), which are then
    # upsampled and refined at full size with fresh optimizer state.
    coarse_share: float = setting(
        "--coarse-share",
        "dgh: share of the iterations run at half resolution before refining at full size.",
        default=0.0,
        kind=float,
        low=0,
        high=1,
        high_open=True,
    )
    coarse_scale: float = 0.5
    # What an idle batch (N > B) keeps between its visits. "moments": float32 (padded) images
    # and the optimizer's image-sized moments in bfloat16 (`IdleStore`), 2.5x the output
    # bytes per image. "compact": float16 images, stochastically rounded, in the output's own
    # memory, and small optimizer state only (`CompactStore`; needs optimizer "adafactor": no
    # first moment, the second factored per image plane): the output bytes, within the
    # issue's bound (N = 256 plus the images themselves). Not the default: trained ResNet-20,
    # N 256, B 64, set BN loss after 30 iters 0.0560 (Adafactor lr 0.15; 0.05: 0.085, 0.4:
    # 0.057; seed 1 and lr 0.25 in tuning runs: 0.057, 0.059; float32 idle images: 0.0562,
    # so float16 costs nothing) against Adam lr 0.15's 0.0746 (seed 1: 0.0744) and RAdam's
    # 0.0776, but after the default 200 iters 0.0059 against RAdam's 0.0035: Adafactor's
    # step is capped at lr_t <= 1/sqrt(t), and long runs keep MCT's RAdam and its moments.
    # benchmarks/dgh_memory.md has the table.
    idle_state: str = setting(
        "--idle-state",
        "dgh, N > batch: what a batch keeps between its visits. moments (default): float32 "
        "images and bfloat16 optimizer moments, ~2.5x the output bytes; compact: float16 images "
        "only, inside the output's memory, ~1x (needs --optimizer adafactor; better on short "
        "runs, worse at the default iterations).",
        default="moments",
        choices=IDLE_STATES,
    )
    # "plateau": MCT's ReduceLROnPlateau (factor, patience, min_lr above). "cosine": lr ->
    # min_lr along half a cosine over each resolution phase, for short runs, where the
    # plateau rarely fires and the last steps still move at the full lr.
    schedule: str = setting(
        "--lr-schedule",
        "dgh: plateau (default, MCT's: halve the lr when the loss stalls) or cosine (decay "
        "to the floor over the run; for short runs).",
        default="plateau",
        choices=SCHEDULES,
    )

    def validate(self) -> None:
        validate_size(self.num_images, self.batch_size)
        validate_steps(self.iters, self.lr)
        if not 0 <= self.zoom < 1 or self.color_shift < 0:
            raise UsageError("zoom must be in [0, 1) and color_shift at least 0")
        if not 0 <= self.coarse_share < 1 or not 0 < self.coarse_scale <= 1:
            raise UsageError("coarse_share must be in [0, 1) and coarse_scale in (0, 1]")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(
                f"the optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.idle_state not in IDLE_STATES:
            raise UsageError(
                f"the idle state must be one of {', '.join(IDLE_STATES)}, got {self.idle_state!r}"
            )
        if self.idle_state == "compact" and self.optimizer != "adafactor":
            raise UsageError(
                "the compact idle state keeps no image-sized optimizer state: it needs "
                f"optimizer 'adafactor', got {self.optimizer!r}"
            )
        if self.schedule not in SCHEDULES:
            raise UsageError(
                f"the lr schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.output_kind not in OUTPUT_LOSSES:
            raise UsageError(
                f"the output loss must be one of {', '.join(OUTPUT_LOSSES)}, "
                f"got {self.output_kind!r}"
            )


# ---------------------------------------------------------------- image pipeline


def gaussian_kernel(channels: int, sigma: float) -> Tensor:
    """Depthwise 3x3 Gaussian kernel [C, 1, 3, 3] whose weights sum to 1."""
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]).square() / (2 * sigma**2))
    k2 = torch.outer(g, g)
    return (k2 / k2.sum()).expand(channels, 1, 3, 3).contiguous()


@dataclass(frozen=True)
class Pipeline:
    """Train view (flip, smooth, random crop, clamp) and finalize view (smooth, centre crop,
    clamp) of images stored with `extra` border pixels; identity + clamp when `kernel` is None.

    Smoothing a normalized kernel with zero padding stays inside the pixel range (0 is the
    mean colour), so the clamp only guards; it runs in place with no autograd node.
    """

    size: tuple[int, int]
    extra: int
    kernel: Tensor | None
    bounds: tuple[Tensor, Tensor]
    zoom: float = 0.0
    color_shift: float = 0.0

    def train(self, x: Tensor, rng: random.Random) -> Tensor:
        if self.kernel is None:
            return x
        if rng.random() < 0.5:
            x = x.flip(3)
        x = self._smooth(x)
        if self.zoom > 0:
            x = self._zoomed(x, rng)
        else:
            top, left = rng.randint(0, self.extra), rng.randint(0, self.extra)
            x = self._crop(x, top, left)
        x = clamp_to_pixels_(x, self.bounds)
        if self.color_shift > 0:
            c = self.color_shift
            n = x.shape[1]
            gain = torch.tensor([math.exp(rng.uniform(-c, c)) for _ in range(n)], device=x.device)
            shift = torch.tensor([rng.uniform(-c, c) for _ in range(n)], device=x.device)
            x = x * gain.view(1, n, 1, 1) + shift.view(1, n, 1, 1)
        return x

    def _zoomed(self, x: Tensor, rng: random.Random) -> Tensor:
        """A random square of (1 - zoom..1) of the padded side, resized to the input size;
        never the outer pixel ring, which the zero-padded smoothing darkens."""
        x = x[:, :, 1:-1, 1:-1]
        side = min(x.shape[2], x.shape[3])
        crop = max(1, round(side * rng.uniform(1 - self.zoom, 1)))
        top, left = rng.randint(0, x.shape[2] - crop), rng.randint(0, x.shape[3] - crop)
        x = x[:, :, top : top + crop, left : left + crop]
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def final(self, x: Tensor) -> Tensor:
        if self.kernel is None:
            return x
        half = self.extra // 2
        return clamp_to_pixels_(self._crop(self._smooth(x), half, half), self.bounds)

    def _smooth(self, x: Tensor) -> Tensor:
        assert self.kernel is not None
        return F.conv2d(x, self.kernel, padding=1, groups=x.shape[1])

    def _crop(self, x: Tensor, top: int, left: int) -> Tensor:
        h, w = self.size
        return x[:, :, top : top + h, left : left + w]


def make_pipeline(
    settings: DghSettings, input_spec: InputSpecLike, device: torch.device, scale: float = 1.0
) -> Pipeline:
    """The pipeline for images of `input_spec`'s size (already scaled by `scale`)."""
    bounds = pixel_bounds(input_spec, device)
    if not settings.augment:
        return Pipeline(input_spec.size, 0, None, bounds)
    given = settings.extra_pixels
    extra = min(input_spec.size) // 7 if given is None else round(given * scale)
    kernel = gaussian_kernel(len(input_spec.mean), settings.smooth_sigma).to(device)
    return Pipeline(input_spec.size, extra, kernel, bounds, settings.zoom, settings.color_shift)


# ---------------------------------------------------------------- output loss


def stretch_loss(z: Tensor) -> Tensor:
    """-mean_i(max_j z_ij - min_j z_ij): widen each image's output range (MCT's default)."""
    z = z.flatten(1)
    return -(z.amax(1) - z.amin(1)).mean()


def regularized_stretch_loss(z: Tensor, features: Tensor, weight: Tensor) -> Tensor:
    """1/range, plus |z_min| and |z_max| pulled towards half of ||a|| ||w_k|| (MCT's
    REGULARIZED_MIN_MAX_DIFF): a range bounded by what the last layer can produce."""
    z = z.flatten(1)
    a = features.flatten(2).mean(2) if features.dim() > 2 else features
    half = 0.5 * a.norm(dim=1)
    rows = weight.flatten(1).norm(dim=1)
    zmax, imax = z.max(1)
    zmin, imin = z.min(1)
    loss = (
        1 / (zmax - zmin + EPS)
        + (zmin.abs() - half * rows[imin]).abs()
        + (zmax.abs() - half * rows[imax]).abs()
    )
    return loss.mean()


class LastLayerInput:
    """Forward pre-hook keeping the input of the model's last Linear/Conv2d (the regularized
    output loss needs it and that layer's weight)."""

    def __init__(self, model: nn.Module) -> None:
        last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
        self.weight: Tensor = last.weight
        self.features: Tensor | None = None
        self._handle = last.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0]

    def remove(self) -> None:
        self._handle.remove()


# ---------------------------------------------------------------- schedule


class PlateauLR:
    """ReduceLROnPlateau kept on the device: the lr is a tensor the optimizer reads, and the
    comparison never leaves the device, so a GPU step needs no host sync.

    Improvement is relative to |loss| because the loss turns negative with the output loss.
    """

    def __init__(self, lr: Tensor, settings: DghSettings) -> None:
        self.lr = lr
        self.best = torch.full_like(lr, math.inf)
        self.bad = torch.zeros_like(lr)
        self.factor = settings.lr_factor
        self.min_lr = settings.min_lr
        self.patience = settings.patience or max(1, settings.iters // 5)

    @torch.no_grad()
    def step(self, loss: Tensor) -> None:
        better = self.best - loss > 1e-4 * loss.abs()  # inf - loss: the first is better
        self.best = torch.where(better, loss, self.best)
        self.bad = torch.where(better, 0, self.bad + 1)
        cut = self.bad > self.patience
        self.lr.copy_(torch.where(cut, (self.lr * self.factor).clamp_min(self.min_lr), self.lr))
        self.bad = torch.where(cut, 0, self.bad)


class CosineLR:
    """lr_t = min_lr + (lr - min_lr) * (1 + cos(pi * t / steps)) / 2, written into the lr
    tensor the optimizer reads (the same interface as PlateauLR; the loss is not used)."""

    def __init__(self, lr: Tensor, settings: DghSettings, steps: int) -> None:
        self.lr = lr
        self.top = float(lr)
        self.min_lr = min(settings.min_lr, self.top)
        self.steps = max(1, steps)
        self.t = 0

    @torch.no_grad()
    def step(self, loss: Tensor) -> None:
        self.t = min(self.t + 1, self.steps)
        w = 0.5 * (1 + math.cos(math.pi * self.t / self.steps))
        self.lr.fill_(self.min_lr + (self.top - self.min_lr) * w)


# ---------------------------------------------------------------- idle batches

PACKED_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class PackedState:
    """One idle batch's optimizer state between its visits.

    Every state tensor shaped like the images (RAdam's and Adam's two moments) is a row of
    `moments`, in bfloat16. Each is as large as the stored (padded) images: in float32 the
    two of them, with a leftover copy of the starting images, made N = 2,048 images cost five
    times their output bytes. The step count and any other small state stay as they were,
    in `small`.

    bfloat16 keeps float32's exponent, so no moment under- or overflows; it rounds the
    mantissa to nearest-even at 8 bits (relative error <= 2^-9). Unpacking is exact, so
    packing what was unpacked gives the same bits back: a batch that wakes and rests without
    a step loses nothing more. Why the rounding is acceptable: the moments only scale the
    step (m / sqrt(v)), they are rounded once per visit, and the images, the output, stay
    exact float32; benchmarks/dgh_memory.md measures the set BN loss reached both ways. A
    run with one batch (N <= B) has no idle batch and never packs: it is bit-identical to
    the float32 path.
    """

    keys: tuple[str, ...]  # the state keys of `moments`' rows, in order
    moments: Tensor  # [len(keys), *images.shape], PACKED_DTYPE
    small: dict[str, Any]


def image_sized_keys(state: dict[str, Any], like: Tensor) -> tuple[str, ...]:
    """The keys of the state tensors as large as the parameter `like`: what gets packed."""
    return tuple(
        k
        for k, v in state.items()
        if isinstance(v, Tensor) and v.is_floating_point() and v.shape == like.shape
    )


def pack_state(state: dict[str, Any], like: Tensor, out: Tensor | None = None) -> PackedState:
    """The compact form of one parameter's optimizer state, written into `out` when given
    ([len(keys), *like.shape], PACKED_DTYPE: a slice of a shared buffer)."""
    keys = image_sized_keys(state, like)
    shape = (len(keys), *like.shape)
    if out is None:
        out = torch.empty(shape, dtype=PACKED_DTYPE, device=like.device)
    if out.shape != shape or out.dtype != PACKED_DTYPE:
        raise ValueError(f"packed state needs {shape} {PACKED_DTYPE}, got {out.shape} {out.dtype}")
    for row, key in zip(out, keys, strict=True):
        row.copy_(state[key])
    small = {k: v for k, v in state.items() if k not in keys}
    return PackedState(keys, out, small)


def unpack_state(packed: PackedState, like: Tensor) -> dict[str, Any]:
    """Float state laid out as the parameter `like` (channels_last on the CPU), for its
    optimizer; the packed rows are not modified."""
    state: dict[str, Any] = dict(packed.small)
    for row, key in zip(packed.moments, packed.keys, strict=True):
        state[key] = torch.empty_like(like, memory_format=torch.preserve_format).copy_(row)
    return state


class IdleStore:
    """The packed optimizer state of every batch of a multi-batch run, in one buffer.

    `wake(b)` gives batch b's optimizer its float32 state back before its step, `rest(b)`
    packs it after, into b's own rows of the buffer. One buffer, allocated at the first rest
    and rewritten in place, rather than a fresh one per step: the allocator then has no holes
    to keep resident, and it goes back to the system in one piece when the run ends.
    """

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches
        self.starts = [0]
        for batch in batches:
            self.starts.append(self.starts[-1] + len(batch.images))
        self.buffer: Tensor | None = None
        self.packed: list[PackedState | None] = [None] * len(batches)

    def wake(self, b: int) -> None:
        """Nothing on the first visit: the optimizer then starts its own state."""
        packed = self.packed[b]
        if packed is not None:
            images = self.batches[b].images
            self.batches[b].optimizer.state[images] = unpack_state(packed, images)

    def rest(self, b: int) -> None:
        images = self.batches[b].images
        state = self.batches[b].optimizer.state.pop(images, None)
        if not state:
            return
        if self.buffer is None:
            rows = len(image_sized_keys(state, images))
            shape = (rows, self.starts[-1], *images.shape[1:])
            self.buffer = torch.empty(shape, dtype=PACKED_DTYPE, device=images.device)
        out = self.buffer[:, self.starts[b] : self.starts[b + 1]]
        self.packed[b] = pack_state(state, images, out)


IMAGE_DTYPE = torch.float16


def round_stochastic(x: Tensor, generator: torch.Generator, out: Tensor | None = None) -> Tensor:
    """float32 `x` in IMAGE_DTYPE, each value rounded to one of its two neighbours at random,
    the nearer the likelier (P = 1 - distance / gap), in `x`'s layout or written into `out`.

    Unbiased, so steps smaller than half a float16 gap (2^-11 relative) still move an image
    on average instead of being rounded away at every visit; a value float16 holds exactly
    is kept whatever the draw, so packing what was unpacked gives the same bits back. The
    draws come from `generator`, so a seed still fixes the run. How: float16 keeps 13 fewer
    mantissa bits than float32, so a uniform integer below 2^13 is added to the float32 bits
    and those 13 bits are cut (towards zero), which leaves a float16 value. Temporaries are
    one int32 and one float16 tensor as large as `x`: a batch's worth. Pixel values in
    normalized space are far inside float16's range; below its smallest normal (6.1e-5) the
    cut keeps more bits than float16 has and the last step rounds to nearest.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"round_stochastic takes float32, got {x.dtype}")
    bits = torch.empty_like(x, dtype=torch.int32).random_(0, 1 << 13, generator=generator)
    bits.add_(x.view(torch.int32)).bitwise_and_(~((1 << 13) - 1))
    if out is None:
        return bits.view(torch.float32).to(IMAGE_DTYPE)
    return out.copy_(bits.view(torch.float32))  # exact: the cut left float16 values


class CompactStore:
    """Idle batches of one phase as float16 images (`round_stochastic`), in one buffer, with
    small optimizer state only.

    `rest(b, batch)` packs the images into batch b's rows of the buffer (`batch.packed`, in
    the images' layout) and empties the float32 parameter (the same tensor object, so the
    optimizer's state stays keyed to it); `wake(batch)` gives the float32 images back.

    The buffer is allocated once and rewritten in place, and each rest hands the visit's
    freed heap pages back (`release_free_heap`), so what stays resident is what is held.
    Given `output` (the run's float32 result, on the same device), the buffer is the
    output's own memory: a padded float16 image is smaller than a float32 output image
    (36 x 36 x 2 against 32 x 32 x 4 bytes on CIFAR), so when the final views are written
    last batch first (`_final_views(reverse=True)`), each one lands only on rows
    already read. The output then costs nothing on top of the idle images: its pages are
    those the packed images touched, and the rest fill at the end, whatever the allocator.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        shape: tuple[int, int, int],
        layout: torch.memory_format,
        generator: torch.Generator,
        output: Tensor | None = None,
    ) -> None:
        self.generator = generator
        per = math.prod(shape)
        total = sum(sizes) * per
        device = generator.device
        flat: Tensor
        if output is not None and output.device == device and 2 * output.numel() >= total:
            flat = output.view(-1).view(IMAGE_DTYPE)[:total]
        else:
            flat = torch.empty(total, dtype=IMAGE_DTYPE, device=device)
        self.in_output = output is not None and flat.data_ptr() == output.data_ptr()
        c, h, w = shape
        self.regions: list[Tensor] = []
        start = 0
        for n in sizes:
            rows = flat[start * per : (start + n) * per]
            if layout == torch.channels_last:
                self.regions.append(rows.view(n, h, w, c).permute(0, 3, 1, 2))
            else:
                self.regions.append(rows.view(n, c, h, w))
            start += n

    def wake(self, batch: Batch) -> None:
        if batch.packed is not None:
            batch.images.data = batch.packed.float()
            batch.packed = None

    def rest(self, b: int, batch: Batch) -> None:
        state = batch.optimizer.state.get(batch.images, {})
        if image_sized_keys(state, batch.images):  # validate() refuses such optimizers
            raise ValueError("the compact idle state cannot hold image-sized optimizer state")
        batch.packed = round_stochastic(batch.images.detach(), self.generator, self.regions[b])
        batch.images.data = batch.images.new_empty(0)  # same tensor, no pixels
        if batch.packed.device.type == "cpu":  # the visit's float32 blocks leave no residue
            release_free_heap()


# ---------------------------------------------------------------- the generator


@dataclass
class Batch:
    """One batch of images being optimized, with its own optimizer and schedule (as MCT)."""

    images: Tensor
    optimizer: torch.optim.Optimizer
    schedule: PlateauLR | CosineLR
    bn_loss: Tensor | None = None
    out_loss: Tensor | None = None
    packed: Tensor | None = None  # the images while idle in the compact mode (IMAGE_DTYPE)

    def __len__(self) -> int:
        return len(self.images if self.packed is None else self.packed)

    def pixels(self) -> Tensor:
        """The float32 images, without gradient, whether awake or packed."""
        return self.images.detach() if self.packed is None else self.packed.float()

    def release(self) -> None:
        """Drop the images (packed or not) and the optimizer state: the batch is done."""
        self.optimizer.state.clear()
        self.packed = None
        self.images.data = self.images.new_empty(0)


def new_batch(x: Tensor, settings: DghSettings, steps: int) -> Batch:
    """A batch with a fresh optimizer and schedule for a phase of `steps` steps."""
    x = x.requires_grad_()
    lr = torch.tensor(settings.lr, device=x.device)
    cuda = x.device.type == "cuda"
    options = {"foreach": cuda}
    if settings.optimizer != "adafactor":  # Adafactor reads its lr on the host each step
        options["capturable"] = cuda
    optimizer = OPTIMIZERS[settings.optimizer]([x], lr=lr, **options)
    if settings.schedule == "cosine":
        return Batch(x, optimizer, CosineLR(lr, settings, steps))
    return Batch(x, optimizer, PlateauLR(lr, settings))


@dataclass
class Run:
    """What one generation shares across steps: model, hooks, targets, pipeline, settings."""

    model: nn.Module
    hooks: BNInputMoments
    targets: list[Moments]
    pipeline: Pipeline
    settings: DghSettings
    rng: random.Random
    head: LastLayerInput | None
    cache: SetMoments | None

    def output_loss(self, z: Tensor) -> Tensor:
        if self.head is None:
            return stretch_loss(z)
        assert self.head.features is not None
        return regularized_stretch_loss(z, self.head.features, self.head.weight)

    def step(self, b: int, batch: Batch) -> None:
        """One RAdam step on batch b, then refresh its cached moments from the final view."""
        self.hooks.clear()
        z = self.model(self.pipeline.train(batch.images, self.rng))
        moments = raw = self.hooks.moments
        if self.cache is not None:
            moments = self.cache.combine(b, raw)
        loss = bn_loss = bn_stat_loss(moments, self.targets)
        out_loss = None
        if self.settings.output_loss:
            out_loss = self.output_loss(z)
            loss = bn_loss + self.settings.output_weight * out_loss
        loss.backward()
        batch.optimizer.step()
        batch.optimizer.zero_grad(set_to_none=True)  # an idle batch holds no gradient
        clamp_to_pixels_(batch.images, self.pipeline.bounds)
        batch.schedule.step(loss.detach())
        batch.bn_loss = bn_loss.detach()
        batch.out_loss = None if out_loss is None else out_loss.detach()
        if self.cache is not None and self.settings.exact_refresh:
            self.refresh(b, batch.images)
        elif self.cache is not None:
            self.cache.store(b, raw)

    @torch.no_grad()
    def refresh(self, b: int, images: Tensor) -> None:
        assert self.cache is not None
        self.hooks.clear()
        self.model(self.pipeline.final(images))
        self.cache.store(b, self.hooks.moments)
        self.hooks.clear()


def generate_dgh(
    model: nn.Module,
    input_spec: InputSpecLike,
    settings: DghSettings,
    progress: Progress | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Synthesize N images with DGH; returns [N, C, H, W] float32 CPU images and metrics.

    `progress(k)` is called after every optimization step, out of ceil(N / B) * iters.
    """
    settings.validate()
    layers = require_bn_layers(model)
    device = model_device(model)
    generator = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    sizes = batch_sizes(settings.num_images, settings.batch_size)
    phases = _phases(settings)
    counter = StepCounter(progress)
    out_shape = (settings.num_images, len(input_spec.mean), *input_spec.size)
    rounding = None
    if settings.idle_state == "compact" and len(sizes) > 1:  # one batch is never idle
        rounding = torch.Generator(device).manual_seed(settings.seed + (1 << 32))
        images = torch.empty(out_shape)  # the last phase's CompactStore lives in it
    start = time.perf_counter()
    with (
        frozen_eval(model),
        channels_last_on_cpu(model, device) as layout,
        BNInputMoments(layers) as hooks,
    ):
        batches: list[Batch] = []
        for i, (scale, iters) in enumerate(phases):
            spec = scaled(input_spec, scale)
            pipeline = make_pipeline(settings, spec, device, scale)
            padded = replace_size(spec, pipeline.extra).size
            compact = None
            if rounding is not None:
                last = images if i == len(phases) - 1 else None
                shape = (len(input_spec.mean), *padded)
                compact = CompactStore(sizes, shape, layout, rounding, last)
            # Lazy: each start is freed once its batch holds it (on the CPU, channels_last
            # is a copy), so the starts never cost a second set of images.
            if i == 0:
                starts = (
                    init_images(n, replace_size(spec, pipeline.extra), generator) for n in sizes
                )
            else:  # upsample the coarse images; the optimizer starts afresh at the new size
                starts = _upsampled(batches, padded, release=compact is not None)
            batches = []
            for b, x in enumerate(starts):  # compact: each batch packed before the next is made
                batch = new_batch(x.to(device, memory_format=layout), settings, iters)
                clamp_to_pixels_(batch.images, pipeline.bounds)
                if compact is not None:
                    compact.rest(b, batch)
                batches.append(batch)
            del starts, x
            run = _make_run(model, hooks, layers, pipeline, settings, batches, rng)
            if i == 0:
                initial = _set_loss(run, _final_views(run, batches), sizes)
            _optimize(run, batches, counter, iters, compact)
        if rounding is None:
            images = torch.empty(out_shape)
            final = _set_loss(run, _final_views(run, batches, images), sizes)
        else:  # last batch first: the packed images may live in `images` (CompactStore)
            views = _final_views(run, batches, images, reverse=True)
            final = _set_loss(run, views, sizes[::-1])
    metrics = {
        "initial_bn_loss": initial,
        "final_bn_loss": final,
        "final_step_bn_loss": _mean_item([b.bn_loss for b in batches]),
        "final_output_loss": _mean_item([b.out_loss for b in batches]),
        "seconds": time.perf_counter() - start,
        "bn_layers": len(layers),
        "extra_pixels": pipeline.extra,
    }
    return images, metrics


def _phases(settings: DghSettings) -> list[tuple[float, int]]:
    """(scale, iterations) per resolution phase: the coarse one (if any), then full size."""
    coarse = round(settings.iters * settings.coarse_share) if settings.coarse_scale < 1 else 0
    fine = settings.iters - coarse
    return [(settings.coarse_scale, coarse)] * (coarse > 0) + [(1.0, fine)] * (fine > 0)


def scaled(input_spec: InputSpecLike, scale: float) -> InputSpecLike:
    if scale == 1.0:
        return input_spec
    h, w = input_spec.size
    return replace(input_spec, size=(round(h * scale), round(w * scale)))  # type: ignore[type-var]


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _upsampled(batches: Sequence[Batch], size: tuple[int, int], release: bool) -> Iterator[Tensor]:
    """Each batch's images resized; with `release`, each batch dropped once resized."""
    for batch in batches:
        x = _resize(batch.pixels(), size)
        if release:
            batch.release()
        yield x


def replace_size(input_spec: InputSpecLike, extra: int) -> InputSpecLike:
    """The input spec of images stored with `extra` more pixels in each dimension."""
    h, w = input_spec.size
    return replace(input_spec, size=(h + extra, w + extra))  # type: ignore[type-var]


def _make_run(
    model: nn.Module,
    hooks: BNInputMoments,
    layers: Sequence[nn.BatchNorm2d],
    pipeline: Pipeline,
    settings: DghSettings,
    batches: Sequence[Batch],
    rng: random.Random,
) -> Run:
    device = batches[0].images.device
    sizes = [len(b) for b in batches]
    head = None
    if settings.output_loss and settings.output_kind == "regularized":
        head = LastLayerInput(model)
    run = Run(model, hooks, bn_targets(layers, device), pipeline, settings, rng, head, None)
    if settings.aggregate and len(batches) > 1:  # one batch is the set: nothing to cache
        run.cache = set_moments(model, hooks, _final_views(run, batches), sizes)
    return run


def _optimize(
    run: Run,
    batches: Sequence[Batch],
    counter: StepCounter,
    iters: int,
    compact: CompactStore | None = None,
) -> None:
    """MCT's order: every iteration visits the batches in a fresh random order.

    With several batches, each one rests between its visits: by default its optimizer state
    is packed (`IdleStore`), so only the batch being optimized holds float32 moments, and
    the packed state is freed when this returns (the end of a phase); with `compact`, its
    images are (`CompactStore`), already packed on entry and still packed on return.
    """
    store = IdleStore(batches) if len(batches) > 1 and compact is None else None
    try:
        for _ in range(iters):
            order = list(range(len(batches)))
            run.rng.shuffle(order)
            for b in order:
                if store is not None:
                    store.wake(b)
                if compact is not None:
                    compact.wake(batches[b])
                run.step(b, batches[b])
                if store is not None:
                    store.rest(b)
                if compact is not None:
                    compact.rest(b, batches[b])
                counter.step()
    finally:
        if run.head is not None:
            run.head.remove()
        run.hooks.clear()


@torch.no_grad()
def _final_views(
    run: Run, batches: Sequence[Batch], out: Tensor | None = None, reverse: bool = False
) -> Iterator[Tensor]:
    """Each batch's final view (the last batch first with `reverse`); with `out`, also copied
    there and the batch's optimizer state dropped, so the end of a run adds only the output
    itself to memory (a packed batch is dropped whole, after its view is made)."""
    starts = [0]
    for batch in batches:
        starts.append(starts[-1] + len(batch))
    order = range(len(batches))
    for b in reversed(order) if reverse else order:
        batch = batches[b]
        view = run.pipeline.final(batch.pixels())
        if out is not None:
            if batch.packed is not None:
                batch.release()
            batch.optimizer.state.clear()
            out[starts[b] : starts[b + 1]] = view
        yield view


def _set_loss(run: Run, views: Iterable[Tensor], sizes: Sequence[int]) -> float:
    cache = set_moments(run.model, run.hooks, views, sizes)
    return float(bn_stat_loss(cache.total(), run.targets))


def _mean_item(values: Sequence[Tensor | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(torch.stack(present).mean()) if present else None


def total_steps(settings: DghSettings) -> int:
    """The `progress` total of `generate_dgh`: ceil(N / B) * iters."""
    return len(batch_sizes(settings.num_images, settings.batch_size)) * settings.iters


register_data(
    "dgh",
    "DGH: set-level BN statistics, augmentations, output stretching",
    DghSettings,
    total=total_steps,
)(generate_dgh)
