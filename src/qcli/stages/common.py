"""What several stages share: naming a model, opening data, saving and rebuilding a .qcli."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from qcli import __version__
from qcli.artifacts import read_qmodel, write_qmodel
from qcli.data import iterate, open_data
from qcli.errors import QcliError, UsageError
from qcli.models import InputSpec, LoadedModel, ModelSource, load_model
from qcli.models.input_spec import family_of
from qcli.quant.capture import QuantGraph, capture
from qcli.quant.plan import WEIGHT_SUFFIX, QuantPlan
from qcli.quant.spec import BitConfig, QuantSpec
from qcli.ui import UI

DEFAULT_MODEL = "builtin:efficientnet_lite0"


@dataclass(frozen=True)
class ModelOptions:
    """A MODEL spec plus the flags that complete it."""

    spec: str = DEFAULT_MODEL
    weights: str | None = None
    arch: str | None = None
    trust_pickle: bool = False
    num_classes: int | None = None
    input_overrides: dict[str, Any] = field(default_factory=dict)

    def source(self) -> ModelSource:
        """Files as absolute paths: a .qcli records them, and is used from other folders."""
        spec = self.spec if family_of(self.spec) else _absolute(self.spec)
        weights = _absolute(self.weights) if self.weights else None
        return ModelSource(spec, weights, self.arch, self.trust_pickle, self.num_classes)

    def load(self, ui: UI | None = None) -> LoadedModel:
        loaded = load_model(self.source(), self.input_overrides)
        if ui is not None:
            for message in loaded.warnings:
                ui.warn(message)
        return loaded

    def input_files(self) -> dict[str, str | None]:
        """The files this model is read from, by flag: no output may replace them."""
        return {"--weights": self.weights, "MODEL": None if family_of(self.spec) else self.spec}


def _absolute(path: str) -> str:
    return os.path.abspath(path) if path else path


def require_python_module(loaded: LoadedModel, what: str) -> None:
    """Quantizing captures the model's Python graph, which TorchScript does not keep."""
    if loaded.scripted:
        raise QcliError(
            f"'{loaded.source.spec}' is a TorchScript model: qcli can evaluate it (qcli eval) "
            f"but cannot {what} it, since that needs the Python module; save its state dict "
            "(torch.save(model.state_dict(), 'w.pt')) and pass 'w.pt --arch ARCH', or save the "
            "module itself with torch.save(model) and pass --trust-pickle"
        )


@dataclass(frozen=True)
class DataOptions:
    path: Path
    limit: int | None = None
    class_list: Path | None = None
    batch_size: int = 32

    def input_files(self, flag: str = "--data") -> dict[str, Path | None]:
        return {flag: self.path, "--class-list": self.class_list}


def device() -> torch.device:
    """CUDA when present: the same code runs on a GPU machine and on a laptop."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_dataset(opts: DataOptions, spec: InputSpec, seed: int) -> Dataset:
    ds = open_data(opts.path, spec, class_list=opts.class_list, limit=opts.limit, seed=seed)
    if len(ds) == 0:
        raise QcliError(f"data folder '{opts.path}' holds no images")
    return ds


def image_batches(ds: Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    for x, _ in iterate(ds, batch_size):
        yield x


def report_skipped(ds: Dataset, ui: UI) -> int:
    skipped = getattr(ds, "skipped", [])
    if skipped:
        path, reason = skipped[0]
        ui.warn(f"skipped {len(skipped)} unreadable image(s), e.g. '{path}' ({reason})")
    return len(skipped)


# -- the .qcli folder -----------------------------------------------------------------------


def save_qmodel(
    path: Path, qg: QuantGraph, loaded: LoadedModel, extra: dict[str, Any], force: bool
) -> None:
    manifest = {
        "qcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": loaded.source.to_dict(),
        "model_name": loaded.name,
        "checksum": loaded.checksum,
        "input_spec": loaded.input_spec.to_dict(),
        "bits": qg.base_plan.describe(),  # a label for people; `plan` is what is read back
        "plan": qg.plan.to_dict(),  # every quantizer's spec: what a reload rebuilds
        **extra,
    }
    write_qmodel(path, manifest, qg.module.state_dict(), force)


@dataclass
class QModel:
    """A .qcli folder rebuilt into its simulation."""

    graph: QuantGraph
    manifest: dict[str, Any]
    input_spec: InputSpec
    source: ModelSource
    loaded: LoadedModel | None = None  # the float source model it was rebuilt from


def is_qmodel(path: str | Path) -> bool:
    """A .qcli folder (rather than a MODEL spec)."""
    p = Path(path)
    return p.is_dir() and (p / "manifest.json").is_file()


def load_qmodel(path: Path, weights: str | Path | None = None) -> QModel:
    """Rebuild the simulation: reload the source model, re-capture, load the stored tensors.

    `weights` points at the source's weights (or model) file when it moved since calibration.
    The source's checksum must match: a .qcli made from other weights would silently pair
    calibrated scales with the wrong network.
    """
    manifest, state = read_qmodel(path)
    try:
        source = ModelSource.from_dict(manifest["source"])
        spec = InputSpec.from_dict(manifest["input_spec"])
        plan = manifest_plan(manifest, str(path))
    except (KeyError, TypeError) as e:
        raise QcliError(f"quantized model '{path}' has an incomplete manifest ({e})") from e
    source = _locate_source(path, source, weights)
    loaded = load_model(source, spec.to_dict())
    if loaded.checksum != manifest.get("checksum"):
        raise QcliError(
            f"quantized model '{path}' was made from different weights than "
            f"'{source.weights or source.spec}' has now (checksum mismatch)"
        )
    qg = capture(loaded.module, (3, *spec.size), plan)
    missing, unexpected = qg.module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QcliError(
            f"quantized model '{path}' does not match its model's graph "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    return QModel(qg, manifest, spec, source, loaded)


def manifest_plan(manifest: dict[str, Any], path: str) -> QuantPlan:
    """The plan a .qcli was saved with; folders from before plans existed carry its parts
    apart (default bits, kept layers, per-layer weight specs), which say the same."""
    where = f"quantized model '{path}'"
    try:
        if "plan" in manifest:
            return QuantPlan.from_dict(manifest["plan"], where)
        bits = BitConfig.parse(manifest["bits"])
        specs = {
            f"{layer['name']}{WEIGHT_SUFFIX}": QuantSpec.from_dict(layer["weight"])
            for layer in manifest.get("layers", [])
            if layer.get("weight")
        }
        # .qcli folders from before int8 ranges existed hold the full grid: export then stores
        # the layers that could saturate as uint8, so they stay exact everywhere.
        plan = QuantPlan.uniform(
            bits, tuple(manifest.get("keep_fp", [])), manifest.get("int8_range", "safe")
        )
        plan = plan.with_bits(weights=manifest.get("layer_bits", {}))
        return dataclasses.replace(plan, specs=specs)
    except (UsageError, ValueError, AttributeError) as e:
        raise QcliError(f"{where} has a malformed plan ({e})") from e


def recorded_file(source: ModelSource) -> str | None:
    """The file a recorded source is read from (its weights, or the model file itself): the
    one `--weights` replaces when it moved."""
    return source.weights if family_of(source.spec) else source.spec


def _locate_source(path: Path, source: ModelSource, weights: str | Path | None) -> ModelSource:
    """The recorded source, with its file replaced by `weights`; a clear error if missing."""
    if weights is not None:
        file = os.path.abspath(weights)
        named = family_of(source.spec) is not None
        return dataclasses.replace(source, **({"weights": file} if named else {"spec": file}))
    recorded = recorded_file(source)
    if recorded and not Path(recorded).exists():
        raise QcliError(
            f"quantized model '{path}' was made from '{recorded}', which does not exist "
            "(moved, or recorded relative to another folder); pass --weights FILE to point "
            "at it (its checksum must match)"
        )
    return source


def dump_json(obj: Any) -> str:
    """Strict JSON: NaN and Inf (a diverged loss) become null, which every parser reads."""
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
