"""Bad inputs that used to lose data, write garbage or end in "internal error".

One test (or one parametrized row) per case of the hardening issue: each asserts the exit code,
that the message names the file, layer or flag, and that nothing the user had was harmed.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from qcli.cli import cli
from qcli.data.images import ImageTransform
from qcli.models import IMAGENET_SPEC, InputSpec, ModelSource, load_model, resnet20
from qcli.stages.common import dump_json

R20 = "builtin:resnet20_cifar10"


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _copy_images(src: Path, dst: Path) -> Path:
    for p in src.rglob("*.png"):
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    return dst


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory, weights: Path, images: Path) -> Path:
    out = tmp_path_factory.mktemp("q") / "r20.qcli"
    args = ("--data", images, "--method", "minmax", "--out", out)
    code, _, err = run("calibrate", R20, "--weights", weights, *args)
    assert code == 0, err
    return out


# -- 1. an output never replaces or sits inside an input ------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_calibrate_out_overlapping_data_is_refused(
    tmp_path: Path, weights: Path, images: Path, where
):
    data = _copy_images(images, tmp_path / "data" / "imgs")
    out = {"same": data, "inside": data / "o.qcli", "holds": data.parent}[where]
    before = _tree(data)
    code, _, err = run(
        "calibrate", R20, "--weights", weights, "--data", data, "--out", out, "--force"
    )
    assert code == 2 and "--data" in err and "--out" in err
    assert _tree(data) == before


def test_quantize_out_holding_eval_data_is_refused(tmp_path: Path, weights: Path, images: Path):
    data = _copy_images(images, tmp_path / "run" / "eval")
    before = _tree(data)
    code, _, err = run(
        "quantize", R20, "--weights", weights, "--data", images, "--eval-data", data,
        "--out", tmp_path / "run", "--force",
    )  # fmt: skip
    assert code == 2 and "--eval-data" in err
    assert _tree(data) == before


def test_export_over_source_weights_is_refused(tmp_path: Path, qmodel: Path, weights: Path):
    before = weights.read_bytes()
    code, _, err = run("export", qmodel, "--out", weights, "--force")
    assert code == 2 and str(weights) in err
    assert weights.read_bytes() == before
    code, _, err = run("export", qmodel, "--out", qmodel, "--force")
    assert code == 2 and "QMODEL" in err and (qmodel / "manifest.json").is_file()


def test_generate_data_over_weights_is_refused(tmp_path: Path, weights: Path):
    before = weights.read_bytes()
    code, _, err = run(
        "generate-data", R20, "--weights", weights, "--method", "noise", "--num-images", "2",
        "--batch-size", "2", "--out", weights, "--force",
    )  # fmt: skip
    assert code == 2 and "--weights" in err and weights.read_bytes() == before


# -- 2. non-finite weights are refused at load, naming the layer ----------------------------


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory) -> Path:
    state = resnet20().state_dict()
    state["layer2.1.conv1.weight"][3, 0, 1, 1] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("command", ["generate-data", "calibrate", "eval"])
def test_non_finite_weights_name_the_layer(tmp_path: Path, nan_weights: Path, images, command):
    extra = {
        "generate-data": (
            "--method",
            "noise",
            "--num-images",
            "2",
            "--batch-size",
            "2",
            "--out",
            tmp_path / "d",
        ),
        "calibrate": ("--data", images, "--out", tmp_path / "o.qcli"),
        "eval": ("--data", images, "--no-latency"),
    }[command]
    code, out, err = run(command, R20, "--weights", nan_weights, *extra, "--json")
    assert code == 1 and "layer2.1.conv1" in err and "NaN" in err
    assert json.loads(out)["exit_code"] == 1  # --json: parseable on failure too
    assert "internal error" not in err and not (tmp_path / "d").exists()


def test_json_is_strict_even_with_nan_metrics():
    text = dump_json({"loss": float("nan"), "nested": [float("inf"), 1.5]})
    assert json.loads(text) == {"loss": None, "nested": [None, 1.5]}


def test_stored_tensors_with_nan_are_refused(tmp_path: Path, qmodel: Path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad.qcli"
    bad.mkdir()
    (bad / "manifest.json").write_bytes((qmodel / "manifest.json").read_bytes())
    state = load_file(str(qmodel / "tensors.safetensors"))
    key = next(k for k in state if k.endswith(".scale"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(bad / "tensors.safetensors"))
    code, _, err = run("export", bad, "--out", tmp_path / "m.onnx")
    assert code == 1 and key in err and not (tmp_path / "m.onnx").exists()


# -- 3. 16-bit PNGs are scaled, not clipped to white ----------------------------------------


def test_sixteen_bit_png_is_scaled(tmp_path: Path):
    ramp = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    spec = InputSpec((32, 32), IMAGENET_SPEC.mean, IMAGENET_SPEC.std)  # no resize, no crop
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode.startswith("I")
        x = ImageTransform(spec)(image)
    pixels = x[0] * spec.std[0] + spec.mean[0]  # back to 0..1
    expected = torch.from_numpy(np.rint(ramp / 257.0) / 255.0).float()
    assert torch.allclose(pixels, expected, atol=1e-5)  # clipped would be 1.0 almost everywhere


# -- 4. TorchScript: evaluated, not quantized, said plainly ---------------------------------


def test_torchscript_is_evaluated_but_not_calibrated(tmp_path: Path, weights: Path, images):
    model = resnet20()
    model.load_state_dict(torch.load(weights)["state_dict"])
    scripted = tmp_path / "r20.ts"
    torch.jit.trace(model.eval(), torch.zeros(1, 3, 32, 32)).save(str(scripted))
    size = ("--image-size", "32")
    code, _, err = run("calibrate", scripted, *size, "--data", images, "--out", tmp_path / "o")
    assert code == 1 and "TorchScript" in err and "state dict" in err and "--arch" in err
    code, out, err = run("eval", scripted, *size, "--data", images, "--no-latency", "--json")
    assert code == 0, err
    assert json.loads(out)["n_images"] == 16


# -- 5. a .qcli records absolute paths and says how to point at a moved file ----------------


def test_qcli_records_absolute_weights_and_export_can_point_at_moved(
    tmp_path: Path, weights: Path, images: Path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "r20.pt").write_bytes(weights.read_bytes())
    monkeypatch.chdir(work)
    code, _, err = run(
        "calibrate", R20, "--weights", "r20.pt", "--data", images, "--method", "minmax",
        "--out", "m.qcli",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((work / "m.qcli" / "manifest.json").read_text())
    assert manifest["source"]["weights"] == str(work / "r20.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run("export", work / "m.qcli", "--out", "a.onnx")
    assert code == 0, err
    (work / "r20.pt").rename(elsewhere / "moved.pt")
    code, _, err = run("export", work / "m.qcli", "--out", "b.onnx")
    assert code == 1 and str(work / "r20.pt") in err and "--weights" in err
    code, _, err = run("export", work / "m.qcli", "--out", "b.onnx", "--weights", "moved.pt")
    assert code == 0, err


# -- 6, 8, 9. refused up front, naming the flag, exit 2 -------------------------------------

BAD_USAGE = [
    (("--image-size", "100000"), "--image-size"),
    (("--out", ""), "--out"),
    (("--out", "."), "--out"),
    (("--out", ".."), "--out"),
    (("--data", ""), "--data"),
    (("--method", "minmax", "--drop-prob", "0.5"), "--drop-prob"),
    (("--method", "mse", "--fisher"), "--fisher"),
    (("--method", "minmax", "--granularity", "block"), "--granularity"),
    (("--method", "mse", "--iters", "1000"), "--iters"),
]


@pytest.mark.parametrize(("args", "flag"), BAD_USAGE)
def test_calibrate_bad_usage(tmp_path: Path, weights: Path, images: Path, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    base = {"--data": images, "--out": tmp_path / "o.qcli"}
    rest = [a for k, v in base.items() if k not in args for a in (k, v)]
    code, out, err = run("calibrate", R20, "--weights", weights, *rest, *args, "--json")
    assert code == 2 and flag in err, err
    assert json.loads(out)["exit_code"] == 2
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, cwd untouched


def test_unwritable_output_fails_before_work(tmp_path: Path, weights: Path, images: Path):
    code, _, err = run(
        "calibrate", R20, "--weights", weights, "--data", images, "--out", "/proc/x.qcli"
    )
    assert code == 1 and "/proc" in err and "internal error" not in err


def test_export_check_data_must_exist(tmp_path: Path, qmodel: Path):
    out = tmp_path / "m.onnx"
    code, _, err = run("export", qmodel, "--out", out, "--check-data", tmp_path / "missing")
    assert code == 2 and "--check-data" in err and not out.exists()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--gen-iters", "5"), "--gen-iters"),
        (("--num-images", "8"), "--num-images"),
        (("--bits", "w8a8", "--iters", "5"), "--iters"),
    ],
)
def test_quantize_inapplicable_flags(tmp_path: Path, weights: Path, images: Path, args, flag):
    code, _, err = run(
        "quantize", R20, "--weights", weights, "--data", images, "--out", tmp_path / "q", *args
    )
    assert code == 2 and flag in err and not (tmp_path / "q").exists()


def test_quantize_limit_without_data_is_refused(tmp_path: Path, weights: Path):
    code, _, err = run("quantize", R20, "--weights", weights, "--limit", "8", "--out", tmp_path)
    assert code == 2 and "--limit" in err


def test_noise_takes_no_iterations(tmp_path: Path, weights: Path):
    code, _, err = run(
        "generate-data", R20, "--weights", weights, "--method", "noise", "--iters", "3",
        "--out", tmp_path / "d",
    )  # fmt: skip
    assert code == 2 and "--iters" in err


# -- 10. random or untrained weights get a loud warning -------------------------------------


def test_random_weights_warn():
    loaded = load_model(ModelSource("torchvision:resnet18"))
    assert not loaded.pretrained
    assert any("random weights" in w for w in loaded.warnings)


def test_untrained_batchnorm_statistics_warn(tmp_path: Path, images: Path):
    path = tmp_path / "fresh.pt"
    torch.save(resnet20().state_dict(), path)  # never trained: BN statistics 0 / 1
    code, _, err = run("eval", R20, "--weights", path, "--data", images, "--no-latency")
    assert code == 0 and "untrained" in err


def test_labels_beyond_the_models_classes_warn(tmp_path: Path, weights: Path, images: Path):
    data = tmp_path / "data"
    for i in range(12):  # 12 classes for a 10-class model
        (data / f"c{i:02d}").mkdir(parents=True)
        src = sorted((images / "cat").iterdir())[0]
        (data / f"c{i:02d}" / src.name).write_bytes(src.read_bytes())
    code, _, err = run("eval", R20, "--weights", weights, "--data", data, "--no-latency")
    assert code == 0 and "go up to 11" in err


# -- 11. --json on failure ------------------------------------------------------------------


def test_json_on_failure_and_on_usage_error(tmp_path: Path):
    code, out, _ = run("export", tmp_path / "missing.qcli", "--out", tmp_path / "m.onnx", "--json")
    assert code == 1 and json.loads(out) == {"error": json.loads(out)["error"], "exit_code": 1}
    assert "missing.qcli" in json.loads(out)["error"]
    code, out, _ = run("calibrate", R20, "--bits", "w9", "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2 and "--bits" in json.loads(out)["error"]


# -- 12. one umask-respecting mode for every output file ------------------------------------


def test_output_modes_follow_umask(qmodel: Path, tmp_path: Path):
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in qmodel.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"tensors.safetensors", "manifest.json"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    assert stat.S_IMODE(qmodel.stat().st_mode) == 0o777 & ~mask
