"""Image folders, class lists, subsets, corrupt files and data-set folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qcli.artifacts import write_dataset
from qcli.data import ImageFolderSet, TensorSet, UnreadableImage, iterate, open_data
from qcli.errors import QcliError
from qcli.models import InputSpec

SPEC = InputSpec(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=20, crop=True)


def make_image(path: Path, colour: tuple[int, int, int] = (255, 0, 0), size=(30, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_folder(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        for i in range(count):
            make_image(root / name / f"{i:03d}.png", (i * 10 % 256, 0, 0))
    return root


def test_sorted_folder_labels_and_transform(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"cat": 2, "ant": 1})
    ds = ImageFolderSet(root, SPEC)
    assert ds.classes == ["ant", "cat"]
    assert [label for _, label in ds.samples] == [0, 1, 1]
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0
    # a solid (0, 0, 0) image normalizes to (0 - 0.5) / 0.25 everywhere
    torch.testing.assert_close(image, torch.full((3, 16, 16), -2.0))


def test_transform_normalizes_colour_and_ends_at_size(tmp_path: Path) -> None:
    make_image(tmp_path / "u" / "wide.jpg", (255, 128, 0), size=(50, 10))
    spec = InputSpec((8, 12), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # no resize, no crop
    image, label = ImageFolderSet(tmp_path / "u", spec)[0]
    assert image.shape == (3, 8, 12) and label == -1
    assert image[0].mean() == pytest.approx(1.0, abs=0.02)
    assert image[2].mean() == pytest.approx(-1.0, abs=0.02)


def test_class_list_file_gives_line_numbers(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"n02": 1, "n04": 2})
    (root / "wnids.txt").write_text("n01\nn02\nn03\nn04\n")
    ds = ImageFolderSet(root, SPEC)  # found automatically
    assert ds.classes == ["n01", "n02", "n03", "n04"]
    assert sorted({label for _, label in ds.samples}) == [1, 3]
    explicit = ImageFolderSet(root, SPEC, class_list=["n04", "n02"])
    assert [label for _, label in explicit.samples] == [1, 0, 0]


def test_folder_missing_from_class_list(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"n02": 1, "zebra": 1})
    listing = tmp_path / "classes.txt"
    listing.write_text("n02\n")
    with pytest.raises(QcliError, match=r"'.*zebra' is not in the class list '.*classes\.txt'"):
        ImageFolderSet(root, SPEC, class_list=listing)


def test_unlabelled_folder(tmp_path: Path) -> None:
    for i in range(3):
        make_image(tmp_path / "flat" / f"{i}.JPG")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    ds = ImageFolderSet(tmp_path / "flat", SPEC)
    assert len(ds) == 3 and ds.classes == []
    _, labels = next(iterate(ds, 8))
    assert labels.tolist() == [-1, -1, -1]


def test_limit_with_seed_is_deterministic(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 10, "b": 10})
    pick = lambda seed: [p.name for p, _ in ImageFolderSet(root, SPEC, limit=5, seed=seed).samples]  # noqa: E731
    assert pick(3) == pick(3)
    assert pick(3) != pick(4)
    files = [p for p, _ in ImageFolderSet(root, SPEC, limit=5, seed=3).samples]
    assert len(files) == 5 and files == sorted(files)


def test_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 3})
    bad = root / "a" / "001.png"
    bad.write_text("this is not an image")
    ds = ImageFolderSet(root, SPEC)
    with pytest.raises(UnreadableImage):
        ds[1]
    batches = list(iterate(ds, 2))
    assert [len(y) for _, y in batches] == [1, 1]
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == str(bad)


def test_truncated_jpeg_is_skipped(tmp_path: Path) -> None:
    good = make_image(tmp_path / "d" / "a.jpg", size=(64, 64))
    data = good.read_bytes()
    (tmp_path / "d" / "b.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolderSet(tmp_path / "d", SPEC)
    assert sum(len(y) for _, y in iterate(ds, 4)) == 1
    assert [Path(p).name for p, _ in ds.skipped] == ["b.jpg"]


def test_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(QcliError, match=r"'.*empty' holds no images"):
        ImageFolderSet(tmp_path / "empty", SPEC)
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "x.txt").write_text("x")
    with pytest.raises(QcliError, match="noimg' holds no images"):
        open_data(tmp_path / "noimg", SPEC)
    with pytest.raises(QcliError, match="missing' does not exist"):
        open_data(tmp_path / "missing", SPEC)


def test_dataset_folder_round_trip(tmp_path: Path) -> None:
    images = torch.randn(10, 3, 16, 16)
    labels = torch.arange(10)
    write_dataset(tmp_path / "ds", images, labels, {"method": "dgh", "input_spec": SPEC}, False)
    ds = open_data(tmp_path / "ds", SPEC)
    assert isinstance(ds, TensorSet) and ds.manifest["method"] == "dgh"
    assert InputSpec.from_dict(ds.manifest["input_spec"]) == SPEC
    got_x, got_y = zip(*iterate(ds, 4), strict=True)
    torch.testing.assert_close(torch.cat(got_x), images)
    assert torch.cat(got_y).tolist() == list(range(10))
    subset = open_data(tmp_path / "ds", SPEC, limit=4, seed=1)
    assert len(subset) == 4 and subset.labels.tolist() == sorted(subset.labels.tolist())


def test_dataset_folder_size_must_match_model(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", np.zeros((2, 3, 8, 8), np.float32), None, {}, False)
    with pytest.raises(QcliError, match=r"holds 8x8 images but the model expects 16x16"):
        open_data(tmp_path / "ds", SPEC)
    small = InputSpec((8, 8), (0, 0, 0), (1, 1, 1))
    assert open_data(tmp_path / "ds", small)[1][1] == -1
