"""The quantized-model folder `*.qcli/`: a manifest plus every tensor in one safetensors file.

safetensors rather than torch.save: it loads without unpickling anything, so a `.qcli`
folder from someone else is safe to open, and its header is checked before any data is read.
The manifest holds the sha256 of the tensor file: a changed scale or bias is a valid file
that export would faithfully turn into a different model (the simulation and the ONNX file
both read it), so only the checksum can tell that the tensors are not the ones calibrated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qcli.artifacts.atomic import (
    atomic_dir,
    prepare_output,
    read_manifest,
    sha256_file,
    write_manifest,
)
from qcli.errors import QcliError

FORMAT = "qcli-model"
FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
CHECKSUM = "tensors_sha256"


def write_qmodel(
    path: Path, manifest: Mapping[str, Any], state: Mapping[str, torch.Tensor], force: bool
) -> Path:
    """Write the caller's manifest (plus format fields) and `state` as given."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state entry {key!r} is a {type(value).__name__}, not a tensor")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[str(key)] = value.detach().cpu().contiguous().clone()
    full = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION}
    prepare_output(path, force)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        full[CHECKSUM] = sha256_file(tmp / TENSORS)
        write_manifest(tmp / "manifest.json", full)
    return path


def read_qmodel(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, state) of a `.qcli` folder, with a QcliError for anything off."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path, FORMAT, FORMAT_VERSION, "quantized model")
    file = path / TENSORS
    if not file.is_file():
        raise QcliError(f"quantized model '{path}' is missing '{TENSORS}'")
    try:
        state = load_file(str(file), device="cpu")
    except Exception as exc:
        raise QcliError(f"'{TENSORS}' of quantized model '{path}' is truncated or corrupt") from exc
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise QcliError(f"'{TENSORS}' of quantized model '{path}' holds NaN/Inf in '{key}'")
    # after the NaN check, which names the tensor; absent in folders from before it was recorded
    expected = manifest.get(CHECKSUM)
    if expected is not None and sha256_file(file) != expected:
        raise QcliError(
            f"'{TENSORS}' of quantized model '{path}' does not match the checksum in its "
            "manifest: it was changed or damaged after calibration"
        )
    return manifest, state
