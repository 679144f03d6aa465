"""What several stages share: naming a model, opening data, saving and rebuilding a .qcli."""

from __future__ import annotations

import json
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
from qcli.errors import QcliError
from qcli.models import InputSpec, LoadedModel, ModelSource, load_model
from qcli.quant.capture import QuantGraph, capture
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
        return ModelSource(self.spec, self.weights, self.arch, self.trust_pickle, self.num_classes)

    def load(self) -> LoadedModel:
        return load_model(self.source(), self.input_overrides)


@dataclass(frozen=True)
class DataOptions:
    path: Path
    limit: int | None = None
    class_list: Path | None = None
    batch_size: int = 32


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
    layers = []
    for name, layer in qg.layers():
        wq = layer.weight_quantizer
        layers.append(
            {
                "name": name,
                "type": type(layer).__name__.removeprefix("Q"),
                "weight": wq.spec.to_dict() if wq is not None else None,
            }
        )
    acts = [{"name": n, **q.spec.to_dict()} for n, q in qg.act_quantizers()]
    manifest = {
        "qcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": loaded.source.to_dict(),
        "model_name": loaded.name,
        "checksum": loaded.checksum,
        "input_spec": loaded.input_spec.to_dict(),
        "bits": str(qg.bits),
        "keep_fp": list(qg.keep_fp),
        "layer_bits": qg.layer_bits,
        "int8_range": qg.int8_range,
        "layers": layers,
        "activations": acts,
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


def load_qmodel(path: Path) -> QModel:
    """Rebuild the simulation: reload the source model, re-capture, load the stored tensors.

    The source's checksum must match: a .qcli made from other weights would silently pair
    calibrated scales with the wrong network.
    """
    manifest, state = read_qmodel(path)
    try:
        source = ModelSource.from_dict(manifest["source"])
        spec = InputSpec.from_dict(manifest["input_spec"])
        bits = BitConfig.parse(manifest["bits"])
    except (KeyError, TypeError) as e:
        raise QcliError(f"quantized model '{path}' has an incomplete manifest ({e})") from e
    loaded = load_model(source, spec.to_dict())
    if loaded.checksum != manifest.get("checksum"):
        raise QcliError(
            f"quantized model '{path}' was made from different weights than "
            f"'{source.weights or source.spec}' has now (checksum mismatch)"
        )
    try:
        layer_specs = {
            layer["name"]: QuantSpec.from_dict(layer["weight"])
            for layer in manifest.get("layers", [])
            if layer.get("weight")
        }
    except (KeyError, TypeError, ValueError) as e:
        raise QcliError(f"quantized model '{path}' has a malformed layer spec ({e})") from e
    qg = capture(
        loaded.module,
        (3, *spec.size),
        bits,
        keep_fp=manifest.get("keep_fp", []),
        layer_bits=manifest.get("layer_bits", {}),
        # .qcli folders from before int8 ranges existed hold the full grid: export then stores
        # the layers that could saturate as uint8, so they stay exact everywhere.
        int8_range=manifest.get("int8_range", "safe"),
        layer_specs=layer_specs,
    )
    missing, unexpected = qg.module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QcliError(
            f"quantized model '{path}' does not match its model's graph "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    return QModel(qg, manifest, spec, source)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
