"""What a model expects as input (size, normalization, resize/crop) and the MODEL families.

A leaf module: the model loader (`spec.py`), the builtin architectures and the data readers
all read it, so it imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from qcli.errors import UsageError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAMILIES = ("builtin", "timm", "torchvision")

Triple = tuple[float, float, float]


# ---------------------------------------------------------------- value parsing


def _as_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"input size must be N or (H, W), got {value!r}") from None
    if h <= 0 or w <= 0:
        raise UsageError(f"input size must be positive, got {(h, w)}")
    return (h, w)


def _as_triple(name: str, value: Any) -> Triple:
    try:
        a, b, c = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"input {name} must be three numbers, got {value!r}") from None
    return (a, b, c)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: size (H, W), normalization and preprocessing.

    `resize` is the shorter side before the optional center `crop` to `size`; whatever the
    steps give, the data loader ends with exactly `size` so batches always stack.
    """

    size: tuple[int, int]
    mean: Triple
    std: Triple
    resize: int | None = None
    crop: bool = False
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        size = _as_size(self.size)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", _as_triple("mean", self.mean))
        std = _as_triple("std", self.std)
        if min(std) <= 0:
            raise UsageError(f"input std must be positive, got {std}")
        object.__setattr__(self, "std", std)
        if self.resize is not None:
            if int(self.resize) <= 0:
                raise UsageError(f"input resize must be a positive integer, got {self.resize}")
            object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", bool(self.crop))
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"input interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> InputSpec:
        """Apply user flags; a new size without a new resize keeps the resize/size ratio."""
        if not overrides:
            return self
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise UsageError(f"unknown input override {unknown[0]!r}")
        if "size" in changes:
            changes["size"] = _as_size(changes["size"])
            if "resize" not in changes and self.resize is not None:
                ratio = self.resize / min(self.size)
                changes["resize"] = round(min(changes["size"]) * ratio)
        return replace(self, **changes)


IMAGENET_SPEC = InputSpec(
    size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=256, crop=True
)


def family_of(spec: str) -> str | None:
    """'timm' for 'timm:resnet18'; None for a file path."""
    prefix, sep, _ = spec.partition(":")
    return prefix if sep and prefix in FAMILIES else None
