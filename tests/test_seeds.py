"""--seed on every stochastic path: the same seed gives the same tensors, another seed others.

Compared are the saved tensors themselves (.qcli tensors, generated images, the ONNX file),
not summaries. The "another seed differs" half is what makes each test fail if --seed were
ignored (a fixed internal seed would pass the first half alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qcli.artifacts import read_dataset
from qcli.cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")

R20 = "builtin:resnet20_cifar10"


def run(*args: Any) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr


def tensors(qcli_folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(qcli_folder / "tensors.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def three_runs(tmp_path: Path, make) -> tuple[Path, Path, Path]:
    """Seed 1, seed 1 again, seed 2; `make(out, seed)` runs one."""
    outs = (tmp_path / "s1", tmp_path / "s1-again", tmp_path / "s2")
    for out, seed in zip(outs, (1, 1, 2), strict=True):
        make(out, seed)
    return outs


def test_qdrop_calibration_follows_the_seed(tmp_path: Path, weights: Path, images: Path):
    def make(out: Path, seed: int) -> None:
        # all 16 images (no --limit): the seed cannot act through the image subset
        method = ["--bits", "w4a4", "--method", "qdrop", "--iters", 3]
        data = ["--data", images]
        run("calibrate", R20, "--weights", weights, *data, *method, "--seed", seed, "--out", out)

    a, b, c = (tensors(p) for p in three_runs(tmp_path, make))
    assert same(a, b)
    assert not same(a, c)
    # the learned part differs, not only bookkeeping: weights (rounding) or activation scales
    learned = [k for k in a if k.endswith(".weight") or k.startswith("act_quant.")]
    assert any(not torch.equal(a[k], c[k]) for k in learned)


def test_dgh_images_follow_the_seed(tmp_path: Path, weights: Path):
    def make(out: Path, seed: int) -> None:
        method = ["--method", "dgh", "--num-images", 4, "--batch-size", 4, "--iters", 2]
        run("generate-data", R20, "--weights", weights, *method, "--seed", seed, "--out", out)

    a, b, c = (read_dataset(p).images for p in three_runs(tmp_path, make))
    assert a.shape == (4, 3, 32, 32) and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_data_free_quantize_follows_the_seed(tmp_path: Path, weights: Path):
    def make(out: Path, seed: int) -> None:
        # w4a8: DGH images, then QDrop and BN tuning on them
        tiny = ["--num-images", 4, "--gen-iters", 2, "--iters", 2, "--no-latency"]
        tiny += ["--bits", "w4a8", "--seed", seed]
        run("quantize", R20, "--weights", weights, *tiny, "--out", out)

    a, b, c = three_runs(tmp_path, make)
    images = [read_dataset(p / "calib-data").images for p in (a, b, c)]
    assert torch.equal(images[0], images[1])
    assert not torch.equal(images[0], images[2])
    qa, qb, qc = (tensors(p / "model.qcli") for p in (a, b, c))
    assert same(qa, qb)
    assert not same(qa, qc)
    # the deployed file too: same seed, same bytes
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert (a / "model.onnx").read_bytes() != (c / "model.onnx").read_bytes()
