"""`noise`: Gaussian images clamped to valid pixels, the weakest baseline (no model needed)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qcli.methods.generators.images import (
    InputSpecLike,
    Progress,
    batch_sizes,
    clamp_to_pixels_,
    init_images,
    pixel_bounds,
    validate_size,
)
from qcli.methods.registry import register_data


@dataclass(frozen=True)
class NoiseSettings:
    num_images: int = 256
    batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        validate_size(self.num_images, self.batch_size)


def total_batches(settings: NoiseSettings) -> int:
    return len(batch_sizes(settings.num_images, settings.batch_size))


def generate_noise(
    model: nn.Module,
    input_spec: InputSpecLike,
    settings: NoiseSettings,
    progress: Progress | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Gaussian N(0,1) images in normalized space, clamped to valid pixels: the weakest baseline.

    Drawn batch by batch from the same seeded stream as `bns`'s starting images, so `noise`
    is exactly where `bns` starts. `progress(k)` gets the batches done, out of ceil(N / B).
    The model is unused; the argument keeps the registry's signature.
    """
    settings.validate()
    start = time.perf_counter()
    bounds = pixel_bounds(input_spec, torch.device("cpu"))
    generator = torch.Generator().manual_seed(settings.seed)
    images = []
    for k, n in enumerate(batch_sizes(settings.num_images, settings.batch_size), 1):
        images.append(clamp_to_pixels_(init_images(n, input_spec, generator), bounds))
        if progress is not None:
            progress(k)
    return torch.cat(images), {"seconds": time.perf_counter() - start}


register_data(
    "noise",
    "Gaussian noise clamped to valid pixels (no model statistics)",
    NoiseSettings,
    total=total_batches,
    uses_model=False,
)(generate_noise)
