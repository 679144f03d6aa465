"""Labels that cannot be the model's classes are mapped or named, never scored silently.

ImageNet images in wnid folders without a class list get ImageNet-1k labels (not their sorted
positions); a model scoring at chance on labelled data gets a sentence naming --class-list.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from qcli.cli import cli
from qcli.data.images import imagenet_wnids, scan_folder

pytestmark = pytest.mark.shared


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_wnid_folders_get_imagenet_labels(shared_data: Path, tmp_path: Path):
    src = shared_data / "imagenet-sample"
    picked = sorted(p for p in src.iterdir() if p.is_dir())[3:6]
    for folder in picked:  # a subset of the classes, and no wnids.txt beside them
        (tmp_path / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    samples, classes = scan_folder(tmp_path, None)
    wnids = imagenet_wnids()
    assert len(classes) == 1000 and tuple(classes) == wnids
    labels = {p.parent.name: label for p, label in samples}
    assert labels == {f.name: wnids.index(f.name) for f in picked}
    assert sorted(labels.values()) != [0, 1, 2]  # not the folders' sorted positions


def test_other_folder_names_keep_their_sorted_positions(shared_data: Path):
    _, classes = scan_folder(shared_data / "cifar10" / "test", None)
    assert classes[:3] == ["airplane", "automobile", "bird"]


def test_scoring_at_chance_names_the_class_list(shared_data: Path, tmp_path: Path):
    weights = shared_data.parent / "models" / "resnet20_cifar10.th"
    if not weights.is_file():
        pytest.skip(f"pretrained ResNet-20 not found at {weights}")
    test = shared_data / "cifar10" / "test"
    names = sorted(p.name for p in test.iterdir() if p.is_dir())
    wrong = tmp_path / "reversed.txt"  # every class gets another class's label
    wrong.write_text("\n".join(reversed(names)) + "\n")
    base = ["eval", "builtin:resnet20_cifar10", "--weights", weights, "--data", test]
    base += ["--limit", 100, "--no-latency"]
    code, _, err = run(*base, "--class-list", wrong)
    assert code == 0, err
    assert "no better than chance" in err and "--class-list" in err
    code, _, err = run(*base)
    assert code == 0 and "chance" not in err
