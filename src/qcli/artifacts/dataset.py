"""The data-set folder: float32 `.npy` image shards plus a manifest saying how they were made.

float32 (not float16) so that calibration on stored data sees exactly the tensors that were
generated; `.npy` so reading needs no pickle (`allow_pickle=False`). Shards of at most
`SHARD_SIZE` images keep each file a reasonable size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from qcli.artifacts.atomic import atomic_dir, prepare_output, read_manifest, write_manifest
from qcli.errors import QcliError

FORMAT = "qcli-dataset"
FORMAT_VERSION = 1
SHARD_SIZE = 1024
RESERVED = ("format", "format_version", "num_images", "shape", "labels", "shards")


class StoredDataset(NamedTuple):
    manifest: dict[str, Any]
    images: torch.Tensor  # float32 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N]


def shard_name(index: int) -> str:
    return f"images-{index:05d}.npy"


def write_dataset(
    path: Path,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None,
    manifest: Mapping[str, Any],
    force: bool,
) -> Path:
    """Write images [N, C, H, W] (and labels [N]) with the caller's manifest fields.

    The caller's fields (method, model, seed, input_spec, losses...) are kept as given; the
    format fields describing the tensors are set here so they cannot disagree with the files.
    """
    path = Path(path)
    array = _as_numpy(images).astype(np.float32, copy=False)
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] array, got {array.shape}")
    label_array = None
    if labels is not None:
        label_array = _as_numpy(labels).astype(np.int64, copy=False).reshape(-1)
        if label_array.shape[0] != array.shape[0]:
            raise ValueError(f"{label_array.shape[0]} labels for {array.shape[0]} images")
    num = int(array.shape[0])
    shards = [shard_name(i) for i in range(math.ceil(num / SHARD_SIZE))]
    full = {k: v for k, v in manifest.items() if k not in RESERVED}
    full.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        num_images=num,
        shape=list(array.shape),
        labels=label_array is not None,
        shards=shards,
    )
    prepare_output(path, force)
    with atomic_dir(path) as tmp:
        for i, name in enumerate(shards):
            np.save(tmp / name, np.ascontiguousarray(array[i * SHARD_SIZE : (i + 1) * SHARD_SIZE]))
        if label_array is not None:
            np.save(tmp / "labels.npy", label_array)
        write_manifest(tmp / "manifest.json", full)
    return path


def read_dataset(path: Path) -> StoredDataset:
    """Read and check a data-set folder; every inconsistency is a QcliError naming the file."""
    path = Path(path)
    manifest = read_manifest(path, FORMAT, FORMAT_VERSION, "data set")
    num, shape = _checked_shape(path, manifest)
    images = torch.empty(shape, dtype=torch.float32)
    target = images.numpy()  # shares memory: shards are copied straight into place
    start = 0
    for name in _shard_names(path, manifest, num):
        block = _load_npy(path, name, np.float32)
        if block.ndim != 4 or tuple(block.shape[1:]) != tuple(shape[1:]):
            raise QcliError(
                f"shard '{name}' of data set '{path}' has shape {block.shape}, "
                f"expected [*, {', '.join(map(str, shape[1:]))}]"
            )
        if start + block.shape[0] > num:
            raise QcliError(f"data set '{path}' holds more images than its manifest says ({num})")
        target[start : start + block.shape[0]] = block
        start += block.shape[0]
    if start != num:
        raise QcliError(f"data set '{path}' holds {start} images but its manifest says {num}")
    bad = (~torch.isfinite(images)).flatten(1).any(1)
    if bool(bad.any()):
        raise QcliError(
            f"data set '{path}' holds NaN/Inf values in {int(bad.sum())} image(s), "
            f"e.g. image {int(bad.nonzero()[0, 0])}"
        )
    labels = None
    if manifest.get("labels"):
        label_array = _load_npy(path, "labels.npy", np.int64)
        if label_array.shape != (num,):
            raise QcliError(
                f"'labels.npy' of data set '{path}' has shape {label_array.shape}, "
                f"expected ({num},)"
            )
        labels = torch.from_numpy(np.array(label_array))
    return StoredDataset(manifest, images, labels)


def _checked_shape(path: Path, manifest: Mapping[str, Any]) -> tuple[int, list[int]]:
    num, shape = manifest.get("num_images"), manifest.get("shape")
    valid = (
        isinstance(num, int)
        and num > 0
        and isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(s, int) and s > 0 for s in shape)
        and shape[0] == num
    )
    if not valid:
        raise QcliError(f"data set '{path}' has a corrupt manifest.json (bad num_images or shape)")
    return num, shape


def _shard_names(path: Path, manifest: Mapping[str, Any], num: int) -> list[str]:
    expected = [shard_name(i) for i in range(math.ceil(num / SHARD_SIZE))]
    listed = manifest.get("shards", expected)
    if listed != expected:
        raise QcliError(
            f"data set '{path}' has a corrupt manifest.json "
            f"(shards {listed!r} do not match {num} images)"
        )
    return expected


def _load_npy(folder: Path, name: str, dtype: type) -> np.ndarray:
    """Memory-map one array (no pickle); the caller copies it where it belongs."""
    file = folder / name
    if not file.is_file():
        raise QcliError(f"data set '{folder}' is missing '{name}'")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise QcliError(f"'{name}' of data set '{folder}' is truncated or corrupt ({exc})") from exc
    if array.dtype != dtype:
        raise QcliError(
            f"'{name}' of data set '{folder}' holds {array.dtype}, expected {np.dtype(dtype)}"
        )
    return array


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
