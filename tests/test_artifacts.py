"""Atomic outputs, the data-set folder and the .qcli folder, including their failure modes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qcli.artifacts import (
    atomic_dir,
    atomic_file,
    prepare_output,
    read_dataset,
    read_qmodel,
    sha256_file,
    write_dataset,
    write_qmodel,
)
from qcli.artifacts.dataset import SHARD_SIZE
from qcli.errors import QcliError


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- atomic writes


def test_atomic_file_keeps_previous_file_when_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("writer died")
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new" and leftovers(tmp_path) == []


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m.qcli"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyError("boom")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_prepare_output_force(tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    target.write_text("x")
    with pytest.raises(QcliError, match=r"output '.*out\.onnx' exists; pass --force"):
        prepare_output(target, force=False)
    prepare_output(target, force=True)
    prepare_output(tmp_path / "a" / "b" / "c.json", force=False)
    assert (tmp_path / "a" / "b").is_dir()


def test_prepare_output_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(QcliError, match=r"cannot write to '.*plain': not a directory"):
        prepare_output(tmp_path / "plain" / "sub" / "out.qcli", force=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_prepare_output_unwritable_parent(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(QcliError, match=r"cannot write to '.*locked': permission denied"):
            prepare_output(locked / "out.qcli", force=False)
    finally:
        locked.chmod(0o700)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


# ---------------------------------------------------------------- .qcli folder


def test_qmodel_round_trip(tmp_path: Path) -> None:
    weight = torch.randn(4, 6)
    state = {
        "conv.weight": weight,
        "conv.weight_t": weight.t(),  # shares storage and is not contiguous
        "conv.scale": torch.rand(4),
        "conv.zero_point": torch.tensor([0, 3, -2, 7], dtype=torch.int8),
    }
    manifest = {"source": {"spec": "timm:resnet18"}, "layers": {"conv": {"bits": 4}}}
    write_qmodel(tmp_path / "m.qcli", manifest, state, force=False)
    got_manifest, got_state = read_qmodel(tmp_path / "m.qcli")
    assert got_manifest["format"] == "qcli-model" and got_manifest["format_version"] == 1
    assert got_manifest["layers"] == {"conv": {"bits": 4}}
    assert got_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got_state[key], value) and got_state[key].dtype == value.dtype
    with pytest.raises(QcliError, match="exists"):
        write_qmodel(tmp_path / "m.qcli", manifest, state, force=False)


def test_qmodel_errors(tmp_path: Path) -> None:
    folder = tmp_path / "m.qcli"
    write_qmodel(folder, {}, {"w": torch.ones(3)}, force=False)
    tensors = folder / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:20])
    with pytest.raises(QcliError, match=r"'tensors\.safetensors' of quantized model .* corrupt"):
        read_qmodel(folder)
    (folder / "manifest.json").write_text('{"format": "qcli-model", "format_')
    with pytest.raises(QcliError, match=r"m\.qcli' has a corrupt manifest\.json"):
        read_qmodel(folder)
    (folder / "manifest.json").write_text(json.dumps({"format": "qcli-model", "format_version": 9}))
    with pytest.raises(QcliError, match="format_version 9, newer"):
        read_qmodel(folder)
    (tmp_path / "plain").mkdir()
    with pytest.raises(QcliError, match=r"'.*plain' is not a quantized model folder"):
        read_qmodel(tmp_path / "plain")
    write_dataset(tmp_path / "ds", np.zeros((1, 3, 2, 2), np.float32), None, {}, False)
    with pytest.raises(QcliError, match="format 'qcli-dataset', not 'qcli-model'"):
        read_qmodel(tmp_path / "ds")


# ---------------------------------------------------------------- data-set folder


def test_dataset_shards_and_manifest(tmp_path: Path) -> None:
    images = np.random.default_rng(0).standard_normal((SHARD_SIZE + 3, 3, 2, 2)).astype(np.float32)
    labels = np.arange(SHARD_SIZE + 3)
    write_dataset(tmp_path / "ds", images, labels, {"seed": 3, "losses": [0.5]}, force=False)
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == ["images-00000.npy", "images-00001.npy", "labels.npy", "manifest.json"]
    stored = read_dataset(tmp_path / "ds")
    assert stored.manifest["num_images"] == SHARD_SIZE + 3 and stored.manifest["seed"] == 3
    assert stored.manifest["labels"] is True and stored.manifest["shape"] == [1027, 3, 2, 2]
    assert np.array_equal(stored.images.numpy(), images)
    assert stored.labels is not None and stored.labels.dtype == torch.int64
    assert stored.labels.tolist() == labels.tolist()


def test_dataset_errors(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    write_dataset(folder, np.zeros((3, 3, 4, 4), np.float32), None, {}, False)
    shard = folder / "images-00000.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(QcliError, match=r"'images-00000\.npy' of data set .* truncated or corrupt"):
        read_dataset(folder)
    shard.unlink()
    with pytest.raises(QcliError, match=r"is missing 'images-00000\.npy'"):
        read_dataset(folder)
    (folder / "manifest.json").write_text("not json")
    with pytest.raises(QcliError, match=r"corrupt manifest\.json"):
        read_dataset(folder)
    with pytest.raises(QcliError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")
