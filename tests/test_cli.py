"""The command line as a user meets it: the chain end to end, and the bad-input table.

Every bad input must end in one sentence naming the file, layer or flag, with exit code 1
(the run failed) or 2 (bad usage), and never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qcli.cli import cli
from qcli.models import resnet20

R20 = "builtin:resnet20_cifar10"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def calibrate_r20(weights: Path, data: Path, *extra) -> tuple[int, str, str]:
    return run("calibrate", R20, "--weights", weights, "--data", data, *extra)


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory, weights: Path, images: Path) -> Path:
    out = tmp_path_factory.mktemp("q") / "r20.qcli"
    code, _, err = calibrate_r20(
        weights,
        images,
        "--bits",
        "w8a8",
        "--method",
        "minmax",
        "--out",
        out,
    )
    assert code == 0, err
    return out


def test_chain_calibrate_export_eval(tmp_path: Path, qmodel: Path, images: Path, weights: Path):
    manifest = json.loads((qmodel / "manifest.json").read_text())
    assert manifest["bits"] == "w8a8" and manifest["method"]["name"] == "minmax"
    weight_specs = [k for k in manifest["plan"]["specs"] if k.endswith(".weight_quantizer")]
    assert len(weight_specs) == 20 and manifest["calibration"]["images"] == 16
    assert not {"layers", "activations", "keep_fp", "int8_range"} & set(manifest)  # in plan
    onnx_path = tmp_path / "r20.onnx"
    code, out, err = run("export", qmodel, "--out", onnx_path, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["opset"] == 17 and report["check"]["disagreement_pct"] <= 2
    code, out, err = run(
        "eval",
        onnx_path,
        "--data",
        images,
        "--reference",
        R20,
        "--weights",
        weights,
        "--no-latency",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 16 and result["kind"] == "onnx"
    assert result["agreement_with_reference"] >= 75  # random weights, 8-bit: mostly equal


def test_input_bits_keep_the_image_at_8_bits_through_export(
    tmp_path: Path, weights: Path, images: Path
):
    out, onnx_path = tmp_path / "r20.qcli", tmp_path / "r20.onnx"
    flags = ["--bits", "w4a4", "--method", "minmax", "--input-bits", "8", "--out", out]
    code, _, err = calibrate_r20(weights, images, *flags)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bits"] == "w4a4, input 8-bit" and manifest["plan"]["input_bits"] == 8
    specs = manifest["plan"]["specs"]
    assert specs["act_quant.x"]["bits"] == 8 and specs["act_quant.relu"]["bits"] == 4
    code, out_json, err = run("export", out, "--out", onnx_path, "--json")
    assert code == 0, err  # the integer kernels match the simulation bit for bit
    exact = json.loads(out_json)["check"]["exact"]
    assert exact["enforced"] and exact["tensors_differ"] == 0
    code, _, err = calibrate_r20(weights, images, *flags[:-2], "--input-bits", "9", "--out", out)
    assert code == 2 and "--input-bits" in err


def test_quantize_keeps_the_input_at_8_bits_below_8_bit_activations(
    tmp_path: Path, weights: Path, images: Path
):
    out = tmp_path / "q"
    code, stdout, err = run(
        *("quantize", R20, "--weights", weights, "--data", images, "--bits", "w4a4"),
        *("--uniform", "--iters", "2", "--no-latency", "--json", "--out", out),
    )
    assert code == 0, err
    assert json.loads(stdout)["bits"] == "w4a4, input 8-bit"
    specs = json.loads((out / "model.qcli" / "manifest.json").read_text())["plan"]["specs"]
    assert specs["act_quant.x"]["bits"] == 8 and specs["act_quant.relu"]["bits"] == 4


def test_seed_gives_identical_calibration(tmp_path: Path, weights: Path, images: Path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.qcli"
        code, _, err = run(
            "calibrate",
            R20,
            "--weights",
            weights,
            "--data",
            images,
            "--limit",
            "10",
            "--seed",
            "3",
            "--method",
            "mse",
            "--out",
            out,
        )
        assert code == 0, err
        outs.append(load_file(str(out / "tensors.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_help_has_examples():
    for cmd in ("quantize", "generate-data", "calibrate", "export", "eval"):
        code, out, _ = run(cmd, "--help")
        assert code == 0 and "Example" in out, cmd


# -- the bad-input table ---------------------------------------------------------------------


def _text_model(tmp: Path) -> Path:
    p = tmp / "notes.pt"
    p.write_text("these are not weights\n")
    return p


def _truncated(tmp: Path) -> Path:
    p = tmp / "cut.pt"
    torch.save({"state_dict": resnet20().state_dict()}, p)
    p.write_bytes(p.read_bytes()[:5000])
    return p


def _pickled(tmp: Path) -> Path:
    p = tmp / "whole.pt"
    torch.save(resnet20(), p)
    return p


def _wrong_arch(tmp: Path) -> Path:
    p = tmp / "resnet18.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), p)
    return p


@pytest.mark.parametrize(
    ("make", "extra", "needle"),
    [
        (lambda t: t / "missing.pt", ["--arch", R20], "missing.pt"),
        (_text_model, ["--arch", R20], "notes.pt"),
        (_truncated, ["--arch", R20], "cut.pt"),
        (_wrong_arch, ["--arch", R20], "resnet18.pt"),
        (_pickled, [], "--trust-pickle"),
    ],
    ids=["missing", "text", "truncated", "wrong-arch", "pickle-untrusted"],
)
def test_bad_model_file(tmp_path: Path, images: Path, make, extra, needle):
    model = make(tmp_path)
    code, _, err = run("calibrate", model, *extra, "--data", images, "--out", tmp_path / "o.qcli")
    assert code == 1, err
    assert needle in err
    _no_traceback(err)
    assert not (tmp_path / "o.qcli").exists()


def test_pickled_module_with_trust_works(tmp_path: Path, images: Path):
    model = _pickled(tmp_path)
    code, _, err = run(
        "calibrate",
        model,
        "--trust-pickle",
        "--image-size",
        "32",
        "--data",
        images,
        "--method",
        "minmax",
        "--out",
        tmp_path / "o.qcli",
    )
    assert code == 0, err


def test_unknown_timm_name(tmp_path: Path, images: Path):
    code, _, err = run("calibrate", "timm:resnet1888", "--data", images, "--out", tmp_path / "o")
    assert code in (1, 2) and "resnet1888" in err
    _no_traceback(err)


def test_empty_data_folder(tmp_path: Path, weights: Path):
    (tmp_path / "empty").mkdir()
    code, _, err = calibrate_r20(
        weights,
        tmp_path / "empty",
        "--out",
        tmp_path / "o.qcli",
    )
    assert code == 1 and "empty" in err
    _no_traceback(err)


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path: Path, weights: Path, images: Path):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    for p in sorted((images / "cat").iterdir())[:3]:
        (data / "cat" / p.name).write_bytes(p.read_bytes())
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, out, err = calibrate_r20(
        weights,
        data,
        "--method",
        "minmax",
        "--out",
        tmp_path / "o.qcli",
        "--json",
    )
    assert code == 0, err
    assert "skipped 1" in err and "broken.jpg" in err
    assert json.loads(out)["images"] == 3


@pytest.mark.parametrize("bits", ["w1a8", "w9a8", "w4", "x"])
def test_bad_bits(tmp_path: Path, weights: Path, images: Path, bits: str):
    code, _, err = calibrate_r20(
        weights,
        images,
        "--bits",
        bits,
        "--out",
        tmp_path / "o.qcli",
    )
    assert code == 2 and "--bits" in err
    _no_traceback(err)


def test_existing_output_needs_force(tmp_path: Path, weights: Path, images: Path):
    out = tmp_path / "o.qcli"
    out.mkdir()
    args = [
        "calibrate",
        R20,
        "--weights",
        weights,
        "--data",
        images,
        "--method",
        "minmax",
        "--out",
        out,
    ]
    code, _, err = run(*args)
    assert code == 1 and "--force" in err and "o.qcli" in err
    code, _, err = run(*args, "--force")
    assert code == 0, err
    assert (out / "manifest.json").exists()


def test_unwritable_output_folder(tmp_path: Path, weights: Path, images: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = calibrate_r20(
        weights,
        images,
        "--out",
        blocker / "sub" / "o.qcli",
    )
    assert code == 1 and "cannot write" in err
    _no_traceback(err)


def test_wrong_input_size_for_data_set(tmp_path: Path, weights: Path):
    from qcli.artifacts import write_dataset

    write_dataset(tmp_path / "ds", torch.zeros(4, 3, 64, 64), None, {}, force=False)
    code, _, err = calibrate_r20(
        weights,
        tmp_path / "ds",
        "--out",
        tmp_path / "o.qcli",
    )
    assert code == 1 and "64x64" in err and "32x32" in err


def test_interrupted_export_keeps_previous_file(tmp_path: Path, qmodel: Path, monkeypatch):
    out = tmp_path / "m.onnx"
    code, _, err = run("export", qmodel, "--out", out)
    assert code == 0, err
    before = out.read_bytes()

    import onnx

    real_save = onnx.save

    def half_then_die(model, path, *a, **k):
        real_save(model, path, *a, **k)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a partial write...
        raise KeyboardInterrupt  # ...and the user presses Ctrl-C

    monkeypatch.setattr(onnx, "save", half_then_die)
    code, _, err = run("export", qmodel, "--out", out, "--force")
    assert code == 130
    assert out.read_bytes() == before
    assert not any(p.name.startswith(".m.onnx") for p in tmp_path.iterdir())


def test_export_of_missing_qmodel(tmp_path: Path):
    code, _, err = run("export", tmp_path / "nope.qcli", "--out", tmp_path / "m.onnx")
    assert code == 1 and "nope.qcli" in err


class WithLayerNorm(torch.nn.Module):
    """A model with a layer that has no integer kernel (module level: torch.save pickles it)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.LayerNorm(30)

    def forward(self, x):
        return self.norm(self.conv(x)).mean((2, 3))


def test_float_layer_runs_in_float_and_strict_names_it(tmp_path: Path, images: Path):
    path = tmp_path / "odd.pt"
    torch.save(WithLayerNorm(), path)
    args = ["calibrate", path, "--trust-pickle", "--image-size", "32", "--data", images]
    code, out, err = run(*args, "--out", tmp_path / "o.qcli", "--json")
    assert code == 0, err
    # the mean produces the logits, which stay float: it runs in float as well
    assert json.loads(out)["ops"]["float_ops"] == {"layer_norm": 1, "mean": 1}
    code, _, err = run(*args, "--strict", "--out", tmp_path / "s.qcli")
    assert code == 1 and "'norm'" in err and "LayerNorm" in err
    assert not (tmp_path / "s.qcli").exists()


@pytest.mark.shared
def test_r20_w8a8_end_to_end_on_cifar(tmp_path: Path, shared_data: Path):
    """Real weights, real images: W8A8 stays within a point of FP and ORT agrees."""
    w = shared_data.parent / "models" / "resnet20_cifar10.th"
    train, test = shared_data / "cifar10" / "train", shared_data / "cifar10" / "test"
    q, o = tmp_path / "r20.qcli", tmp_path / "r20.onnx"
    code, _, err = run(
        "calibrate",
        R20,
        "--weights",
        w,
        "--data",
        train,
        "--limit",
        "128",
        "--bits",
        "w8a8",
        "--out",
        q,
    )
    assert code == 0, err
    code, out, err = run("export", q, "--out", o, "--check-data", test, "--json")
    assert code == 0, err
    assert json.loads(out)["check"]["disagreement_pct"] == 0
    common = ["--data", test, "--limit", "1000", "--no-latency", "--json"]
    code, out, err = run("eval", R20, "--weights", w, *common)
    assert code == 0, err
    fp = json.loads(out)["top1"]
    code, out, err = run("eval", o, "--reference", R20, "--weights", w, *common)
    assert code == 0, err
    result = json.loads(out)
    assert fp > 75
    assert result["top1"] >= fp - 1.0
    assert result["agreement_with_reference"] >= 97
    # the deployed arithmetic is the simulated one on this CPU, and on any CPU (static check)
    assert result["saturating_layers"] == 0
    assert result["kernel_check"]["changed_pct"] <= 1.0


def _first_of_each_class(src: Path, dst: Path, n: int) -> Path:
    """A labelled subset without copying: the first n images of every class, linked."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:n]:
            (dst / cls.name / f.name).symlink_to(f)
    return dst


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_r20_quantize_w4_with_real_weights_on_cifar(tmp_path: Path, shared_data: Path):
    """`quantize --bits 4` (the 4-bit size as a budget, A8, QDrop) on the pretrained
    ResNet-20 and real CIFAR-10 images keeps the float model's accuracy on 300 test images, and the
    exported file computes what the integer-exact simulation does, bit for bit."""
    w = shared_data.parent / "models" / "resnet20_cifar10.th"
    if not w.is_file():
        pytest.skip(f"pretrained ResNet-20 not found at {w}")
    train = shared_data / "cifar10" / "train"
    test = _first_of_each_class(shared_data / "cifar10" / "test", tmp_path / "test", 30)
    code, out, err = run(
        *("quantize", R20, "--weights", w, "--bits", "4", "--iters", "20"),
        *("--data", train, "--limit", "256", "--eval-data", test, "--no-latency"),
        *("--out", tmp_path / "q", "--json"),
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["method"] == "qdrop"
    alloc = r["allocate_bits"]  # the 4-bit size is a budget; the plan within it (or uniform)
    assert r["bits"] == ("mixed at the size of w4a8" if alloc["chosen"] == "mixed" else "w4a8")
    assert r["plan"]["weight_bytes"] <= alloc["budget"]["value"]
    fp, q = r["eval_fp"], r["eval_quantized"]
    assert fp["n"] == q["n"] == 300
    assert fp["top1"] > 75  # the real weights (chance: 10)
    assert q["top1"] >= max(70.0, fp["top1"] - 4.0)
    assert q["agreement_with_reference"] >= 85
    exact = r["export"]["check"]["exact"]
    assert exact["enforced"] and exact["images"] > 0 and exact["tensors"] > 0
    assert exact["tensors_differ"] == 0 and exact["images_differ"] == 0


@pytest.mark.parametrize("command", ["calibrate", "generate-data"])
def test_seed_out_of_range_is_a_usage_error(command: str, tmp_path: Path, weights: Path):
    code, _, err = run(
        command, R20, "--weights", weights, "--seed", str(2**64), "--out", tmp_path / "o"
    )
    assert code == 2 and "--seed" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_progress_is_logged_line_by_line_without_a_terminal(
    tmp_path: Path, weights: Path, images: Path
):
    """In a CI log (stderr not a terminal) every stage says when it starts and ends, and a
    reconstruction names each unit as it starts, instead of bars that appear only when done."""
    code, _, err = calibrate_r20(
        weights, images, "--bits", "w4a8", "--method", "qdrop", "--iters", 2,
        "--out", tmp_path / "q.qcli",
    )  # fmt: skip
    assert code == 0, err
    lines = err.splitlines()
    assert any(line.startswith("calibrate (qdrop): started") for line in lines)
    units = [line for line in lines if line.startswith("calibrate (qdrop): unit ")]
    assert len(units) == 11 and units[0].startswith("calibrate (qdrop): unit 1/11 conv1")
    assert any(line.startswith("calibrate (qdrop): done") for line in lines)
    assert "━" not in err  # no progress bar drawn


def test_keep_fp_is_one_comma_list_for_every_command(tmp_path: Path, weights: Path, images: Path):
    """--keep-fp is parsed once, by its parameter type: spaces and empty items drop out."""
    from qcli.cli import CommaList

    assert CommaList().convert(" conv1 , ,fc,", None, None) == ("conv1", "fc")
    assert CommaList().convert("", None, None) == ()
    for command in ("calibrate", "qat", "allocate-bits"):
        (keep,) = [p for p in cli.commands[command].params if p.name == "keep_fp"]
        assert isinstance(keep.type, CommaList)
    out = tmp_path / "k.qcli"
    code, _, err = calibrate_r20(
        weights, images, "--method", "minmax", "--keep-fp", " conv1 ,, layer1.0.conv1", "--out", out
    )
    assert code == 0, err
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    assert plan["keep_fp"] == ["conv1", "layer1.0.conv1"]
