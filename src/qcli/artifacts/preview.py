"""A PNG grid of images, de-normalized, so a person can look at generated calibration data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from qcli.artifacts.atomic import atomic_file

MAX_PREVIEW = 64  # an 8x8 grid: enough to judge variety, small enough to open anywhere


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized [N, C, H, W] back to pixels in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def write_preview(
    path: Path,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    limit: int = MAX_PREVIEW,
) -> Path:
    """Write the first `limit` images as a square-ish PNG grid, atomically."""
    from torchvision.utils import make_grid, save_image

    shown = denormalize(images[:limit].detach().float().cpu(), mean, std)
    grid = make_grid(shown, nrow=math.ceil(math.sqrt(len(shown))), padding=2, pad_value=1.0)
    with atomic_file(Path(path)) as tmp:
        save_image(grid, tmp, format="png")
    return Path(path)
