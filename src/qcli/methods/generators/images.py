"""What every data generator shares about images: sizes, the valid pixel range, seeded starts.

Images live in the model's normalized input space, as the model consumes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from qcli.errors import UsageError

Progress = Callable[[int], None]


class InputSpecLike(Protocol):
    size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]


def validate_size(num_images: int, batch_size: int) -> None:
    """Refuse a set size and batch size that cannot produce images, naming the CLI flag."""
    if num_images <= 0:
        raise UsageError(f"--num-images must be positive, got {num_images}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if batch_size > num_images:
        raise UsageError(f"--batch-size ({batch_size}) must not exceed --num-images ({num_images})")


def validate_steps(iters: int, lr: float) -> None:
    if iters <= 0:
        raise UsageError(f"--iters must be positive, got {iters}")
    if not lr > 0:
        raise UsageError(f"--lr must be positive, got {lr}")


def batch_sizes(num_images: int, batch_size: int) -> list[int]:
    """Full batches, then the remainder (the last batch is short when N % B != 0)."""
    full, rest = divmod(num_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


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


class StepCounter:
    """Counts optimization steps and reports the running total to `progress`."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done)
