"""Negative controls for `qcli export`'s gate, on the pretrained CIFAR ResNet-20.

Two guards stand between a wrong model and the output file, and both are tested here:
1. integrity: a .qcli whose tensors changed after calibration (a scale, a zero point, a
   bias, a removed quantizer, a flipped byte) is refused before anything is exported. The
   gate cannot catch these: the simulation and the ONNX file are both built from the same
   (changed) tensors, so they agree; only the manifest's checksum can tell.
2. the gate: the exported file must compute what the simulation computes. An exporter bug is
   injected (the file is written from a corrupted copy of the graph, or edited after
   writing; or the simulation is corrupted in memory) and the comparison must fail.
Either way `qcli export` exits 1 and a previously exported file stays byte for byte.

The gate compares onnxruntime's integer kernels with the integer-exact simulation bit for
bit (logits and every activation quantizer's codes), so it also sees what a tolerance on the
logits could not (over 32 check images the float simulation and the file differ by 0.4-0.5%
of the logit range here, up to 2.6% on EfficientNet-Lite0): one activation scale changed in
Q and DQ alike (~1% even at +50%), a zero point off by 1-5 steps (<= 1.7%), one activation
quantizer left out (<= 3.7%). The reference-arithmetic run keeps that tolerance.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

import qcli.stages.export as export_stage
from qcli.cli import cli
from qcli.data import iterate, open_data
from qcli.quant.capture import QuantGraph
from qcli.quant.quantizer import QuantMode, set_mode
from qcli.stages.common import load_qmodel

pytestmark = [pytest.mark.shared, pytest.mark.usefixtures("one_thread")]

R20 = "builtin:resnet20_cifar10"
INPUT_Q = "act_quant.x"  # the quantizer of the network input
MID_LAYER = "layer2.1.conv2"


def run(*args: Any) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@dataclass(frozen=True)
class Calibrated:
    qmodel: Path
    onnx: Path  # the honest export
    check: dict[str, Any]  # its sim-vs-onnxruntime report
    test_images: Path


@pytest.fixture(scope="module")
def r20(shared_data: Path, tmp_path_factory) -> dict[str, Calibrated]:
    """MSE at W8A8 and W4A8 on 256 CIFAR-10 training images, exported honestly."""
    weights = shared_data.parent / "models" / "resnet20_cifar10.th"
    if not weights.is_file():
        pytest.skip(f"pretrained ResNet-20 not found at {weights}")
    train, test = shared_data / "cifar10" / "train", shared_data / "cifar10" / "test"
    root = tmp_path_factory.mktemp("gate")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = {}
        for bits in ("w8a8", "w4a8"):
            q, o = root / f"r20-{bits}.qcli", root / f"r20-{bits}.onnx"
            flags = ["--limit", 256, "--bits", bits, "--method", "mse", "--out", q]
            code, _, err = run("calibrate", R20, "--weights", weights, "--data", train, *flags)
            assert code == 0, err
            code, out, err = run("export", q, "--out", o, "--check-data", test, "--json")
            assert code == 0, err  # the honest export passes the gate
            made[bits] = Calibrated(q, o, json.loads(out)["check"], test)
    finally:
        torch.set_num_threads(before)
    return made


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def previous(tmp_path: Path, r20: dict[str, Calibrated]) -> Path:
    """An ONNX file from an earlier honest export, which a failed export must leave as it is."""
    out = tmp_path / "deployed.onnx"
    shutil.copyfile(r20["w8a8"].onnx, out)
    return out


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_honest_export_passes_with_room(r20: dict[str, Calibrated], bits: str):
    check = r20[bits].check
    assert check["ok"] and check["decisive_flips"] == 0 and check["images"] == 32
    # integer end to end: held to the bit, and bit-identical at the logits and every quantizer
    exact = check["exact"]
    assert exact["enforced"] and exact["tensors"] == len(json.loads(_codes(r20[bits].onnx))) + 1
    assert exact["tensors_differ"] == 0 and exact["images_differ"] == 0
    for report in check["runs"].values():
        # an honest export sits well inside the tolerance (one-step flips only)
        assert report["max_abs_diff"] <= 0.5 * report["max_relative_error"] * report["logit_range"]


def test_reference_tolerance_binds_only_where_the_integer_path_is_not_exact(
    r20: dict[str, Calibrated], monkeypatch: pytest.MonkeyPatch
):
    """Float rounding in the reference arithmetic drifts past the logit tolerance on honest
    narrow-activation files; where the integer path matched bit for bit only a decisive flip
    fails it. Shown with the tolerance shrunk to nothing: the exact file passes, and the same
    file checked without its integer run (`fused=False`, as on a saturating CPU) fails."""
    monkeypatch.setattr(export_stage, "MAX_RELATIVE_ERROR_A8", 1e-9)
    monkeypatch.setattr(export_stage, "MIN_LOGIT_STEPS", 0)
    c = r20["w8a8"]
    qm = load_qmodel(c.qmodel)
    x = torch.cat([b for b, _ in iterate(open_data(c.test_images, qm.input_spec, limit=32), 32)])
    exact = export_stage.compare_with_simulation(qm, c.onnx, x)
    ref = exact["runs"]["reference"]
    assert exact["ok"] and ref["ok"] and not ref["tolerance_enforced"]
    assert ref["max_abs_diff"] > 0  # the drift is there, and only reported
    alone = export_stage.compare_with_simulation(qm, c.onnx, x, fused=False)
    assert not alone["ok"] and alone["runs"]["reference"]["tolerance_enforced"]


def _codes(path: Path) -> str:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return props["qcli_quantizer_codes"]


# -- 1. integrity: changed tensors are refused -----------------------------------------------


def _scale(state: dict[str, torch.Tensor]) -> None:
    state[f"{INPUT_Q}.scale"] = state[f"{INPUT_Q}.scale"] * 1.01


def _zero_point(state: dict[str, torch.Tensor]) -> None:
    state[f"{INPUT_Q}.zero_point"] = state[f"{INPUT_Q}.zero_point"] + 1


def _bias(state: dict[str, torch.Tensor]) -> None:
    bias = state[f"{MID_LAYER}.bias"]
    state[f"{MID_LAYER}.bias"] = bias + 0.01 * bias.abs().mean()


def _removed_quantizer(state: dict[str, torch.Tensor]) -> None:
    for key in [k for k in state if k.startswith(f"{INPUT_Q}.")]:
        del state[key]


@pytest.mark.parametrize(
    "change",
    [_scale, _zero_point, _bias, _removed_quantizer, None],
    ids=["scale+1%", "zero-point+1", "bias+1%", "removed-quantizer", "flipped-byte"],
)
def test_changed_tensors_are_refused(
    tmp_path: Path,
    r20: dict[str, Calibrated],
    previous: Path,
    change: Callable[[dict[str, torch.Tensor]], None] | None,
):
    qmodel = tmp_path / "copy.qcli"
    shutil.copytree(r20["w8a8"].qmodel, qmodel)
    tensors = qmodel / "tensors.safetensors"
    if change is None:  # a damaged byte inside the tensor data, the file still parses
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0x01
        tensors.write_bytes(bytes(data))
    else:  # a valid safetensors file with other values
        state = load_file(str(tensors))
        change(state)
        save_file(state, str(tensors))
    before = previous.read_bytes()
    code, _, err = run("export", qmodel, "--out", previous, "--force")
    assert code == 1, err
    assert "tensors.safetensors" in err and "Traceback" not in err
    assert previous.read_bytes() == before
    assert leftovers(previous) == []


# -- 2. the gate: the file must compute what the simulation computes -------------------------


def _input_scale_mismatch(model: onnx.ModelProto) -> None:
    """The input's DequantizeLinear reads a scale 25% larger than its QuantizeLinear."""
    graph = model.graph
    dq = next(n for n in graph.node if n.name == "act_quant_x_dq")
    init = next(i for i in graph.initializer if i.name == dq.input[1])
    wrong = numpy_helper.to_array(init) * np.float32(1.25)
    graph.initializer.append(numpy_helper.from_array(wrong, f"{init.name}_wrong"))
    dq.input[1] = f"{init.name}_wrong"


def _bypass(graph: onnx.GraphProto, q: onnx.NodeProto, dqs: list[onnx.NodeProto]) -> None:
    """Take a QuantizeLinear and its DequantizeLinears out: their readers read the float."""
    outs = {dq.output[0] for dq in dqs}
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in outs:
                n.input[i] = q.input[0]
    for node in [*dqs, q]:
        graph.node.remove(node)


def _no_activation_quantizers(model: onnx.ModelProto) -> None:
    """Every activation QuantizeLinear -> DequantizeLinear pair left out of the file."""
    graph = model.graph
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        _bypass(graph, q, [n for n in graph.node if q.output[0] in n.input])


def _input_zero_point(qg: QuantGraph) -> None:
    dict(qg.act_quantizers())[INPUT_Q].zero_point.add_(20)


def _one_bias(qg: QuantGraph) -> None:
    layer = dict(qg.layers())[MID_LAYER]
    layer.bias.add_(0.5 * layer.bias.abs().mean())


MID_Q = "act_quant.layer2_1_relu1"  # the quantizer after a ReLU mid-network


def _mid_scale(factor: float) -> Callable[[QuantGraph], None]:
    def bug(qg: QuantGraph) -> None:
        dict(qg.act_quantizers())[MID_Q].scale.mul_(factor)

    return bug


def _mid_zero_point(steps: int) -> Callable[[QuantGraph], None]:
    def bug(qg: QuantGraph) -> None:
        dict(qg.act_quantizers())[MID_Q].zero_point.add_(steps)

    return bug


def _every_zero_point_plus_one(qg: QuantGraph) -> None:
    for _, q in qg.act_quantizers():
        q.zero_point.add_(1)


def _one_quantizer_removed(model: onnx.ModelProto) -> None:
    """The mid-network QuantizeLinear -> DequantizeLinear pair left out of the file."""
    graph = model.graph
    stem = MID_Q.replace(".", "_")
    q = next(n for n in graph.node if n.name == f"{stem}_q")
    _bypass(graph, q, [next(n for n in graph.node if n.name == f"{stem}_dq")])


@dataclass(frozen=True)
class ExporterBug:
    name: str
    graph: Callable[[QuantGraph], None] | None = None  # applied to a copy before writing
    onnx: Callable[[onnx.ModelProto], None] | None = None  # applied to the written model


BUGS = [
    ExporterBug("input-scale-x1.25-in-DQ-only", onnx=_input_scale_mismatch),
    ExporterBug("input-zero-point+20", graph=_input_zero_point),
    ExporterBug("one-bias+50%-of-mean", graph=_one_bias),
    ExporterBug("no-activation-quantizers", onnx=_no_activation_quantizers),
    # what the tolerance alone could not see (exported without complaint before the
    # integer-exact comparison): each moves codes, so the exact check must catch it
    *[ExporterBug(f"one-act-scale{f - 1:+.1%}", graph=_mid_scale(f)) for f in (1.001, 1.5)],
    *[ExporterBug(f"zero-point+{k}-after-relu", graph=_mid_zero_point(k)) for k in (1, 20)],
    ExporterBug("one-act-quantizer-removed", onnx=_one_quantizer_removed),
    ExporterBug("every-act-zero-point+1", graph=_every_zero_point_plus_one),
]


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_gate_fails_an_export_that_disagrees(
    monkeypatch: pytest.MonkeyPatch,
    r20: dict[str, Calibrated],
    previous: Path,
    bug: ExporterBug,
    bits: str,
):
    real_to_onnx = export_stage.to_onnx

    def buggy_to_onnx(qg: QuantGraph, *args, **kwargs) -> onnx.ModelProto:
        if bug.graph is not None:
            qg = copy.deepcopy(qg)
            with torch.no_grad():
                bug.graph(qg)
        model = real_to_onnx(qg, *args, **kwargs)
        if bug.onnx is not None:
            bug.onnx(model)
        return model

    monkeypatch.setattr(export_stage, "to_onnx", buggy_to_onnx)
    before = previous.read_bytes()
    check = ["--check-data", r20[bits].test_images]
    code, _, err = run("export", r20[bits].qmodel, "--out", previous, "--force", *check)
    assert code == 1, err
    assert "disagrees with the" in err and "Traceback" not in err
    assert previous.read_bytes() == before
    assert leftovers(previous) == []


def _disable_activation_quantizers(qg: QuantGraph) -> None:
    set_mode(qg.select(weights=False), QuantMode.OFF)


def _all_biases(qg: QuantGraph) -> None:
    for _, layer in qg.layers():
        if layer.bias is not None:
            layer.bias.add_(0.1 * layer.bias.abs().mean())


@pytest.mark.parametrize("corrupt", [_disable_activation_quantizers, _all_biases, _one_bias])
def test_gate_fails_a_corrupted_simulation(
    r20: dict[str, Calibrated], corrupt: Callable[[QuantGraph], None]
):
    """The same comparison the export runs, with the honest file and a corrupted simulation."""
    honest = r20["w8a8"]
    qm = load_qmodel(honest.qmodel)
    ds = open_data(honest.test_images, qm.input_spec, limit=32, seed=0)
    x = torch.cat([b for b, _ in iterate(ds, 32)])
    assert export_stage.compare_with_simulation(qm, honest.onnx, x)["ok"]
    with torch.no_grad():
        corrupt(qm.graph)
    assert not export_stage.compare_with_simulation(qm, honest.onnx, x)["ok"]


def test_tiny_logits_are_not_refused(shared_data: Path, tmp_path: Path):
    """A random-init mobilenet_v3_small's activations decay to ~1e-8: its logits span ~1e-9,
    under two logit steps, and one honest flip moved them by 40% of that range. The gate
    refused this correct file until the tolerances had a floor of a few logit steps."""
    q, o = tmp_path / "mnv3.qcli", tmp_path / "mnv3.onnx"
    data = ["--data", shared_data / "imagenet-sample", "--limit", 16, "--method", "minmax"]
    code, _, err = run("calibrate", "torchvision:mobilenet_v3_small", *data, "--out", q)
    assert code == 0, err
    code, out, err = run("export", q, "--out", o, "--json")
    assert code == 0, err
    check = json.loads(out)["check"]
    assert check["ok"] and check["logit_range"] < 1e-6
    assert check["max_abs_diff"] <= export_stage.MIN_LOGIT_STEPS * check["logit_step"]
