"""Ops without an integer kernel: capture keeps them in float between DequantizeLinear and
QuantizeLinear instead of refusing the model, in the simulation and the ONNX file alike.

Covers the float fallback (an op outside the table, exported by torch's ONNX exporter), a
submodule fx cannot trace (a float leaf), attention split into integer MatMuls, shapes that
follow the batch at run time, and what the CLI says about all of it (--strict, --show-float,
BN tuning and data-free generation on a model without BatchNorm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from qcli.cli import cli
from qcli.errors import QcliError
from qcli.export.onnx_qdq import INPUT_NAME, to_onnx
from qcli.methods.range_setting import fit_bias_grids, set_activation_ranges, set_weight_ranges
from qcli.models.builtin import build_architecture
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(model: nn.Module, shape: tuple[int, ...], bits: str = "w8a8"):
    qg = capture(model.eval(), shape, QuantPlan.uniform(BitConfig.parse(bits)))
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, [x], "minmax")
    fit_bias_grids(qg)
    return qg, x


def _ort(model: onnx.ModelProto, x: torch.Tensor, optimize: bool = False) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x.numpy()})[0]


def _agrees(qg, x: torch.Tensor, tol: float = 1e-5) -> onnx.ModelProto:
    """The file computes the simulation (to float rounding) at two batch sizes."""
    model = to_onnx(qg)
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        sim = qg(x).numpy()
    for batch in (x.shape[0], 1):
        got = _ort(model, x[:batch])
        assert got.shape == sim[:batch].shape
        assert np.abs(got - sim[:batch]).max() <= tol * max(float(np.ptp(sim)), 1.0)
    return model


class Gated(nn.Module):
    """Python control flow on a tensor's value: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.mean() > 100:  # never true here; the branch exists, which is what matters
            return x
        return self.conv(x) * 0.5 + x


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gated()
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.gate(F.relu(self.stem(x))).mean((2, 3)))


def test_untraceable_submodule_becomes_a_float_leaf_and_exports():
    qg, x = _calibrated(WithGate(), (3, 6, 6))
    report = qg.op_report()
    assert report["float_leaves"] == ["gate"]
    assert report["float_ops"] == {"Gated": 1}
    layers = {name for name, _ in qg.layers()}
    assert layers == {"stem", "head"}  # the leaf's conv stays float, inside the leaf
    _agrees(qg, x)


def test_top_level_control_flow_is_refused_in_one_sentence():
    with pytest.raises(QcliError, match=r"top-level forward has data-dependent control flow"):
        capture(Gated().eval(), (4, 4, 4), QuantPlan.uniform(BitConfig(8, 8)))


class Attention(nn.Module):
    """A pre-norm attention block over patch tokens, written with torch's fused SDPA."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 7)
        self.heads = heads

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)
        b, n, c = t.shape
        qkv = self.qkv(self.norm(t)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return self.head(t[:, 0])


def test_attention_runs_its_two_products_in_integer_matmuls():
    qg, x = _calibrated(Attention(), (3, 8, 8))
    report = qg.op_report()
    assert report["float_ops"] == {"layer_norm": 1, "attention_softmax": 1}
    code = qg.module.code
    assert "scaled_dot_product_attention" not in code
    assert code.count("torch.matmul") == 2
    quantized = {name for name, _ in qg.act_quantizers()}
    assert {"act_quant.matmul_1", "act_quant.attention_softmax"} <= quantized
    # q·kᵀ feeds only the float softmax: onnxruntime runs it from integers to float
    # (MatMulIntegerToFloat), and requantizing the scores would only add error
    assert "act_quant.matmul" not in quantized
    model = _agrees(qg, x)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) >= 2


def test_attention_split_computes_what_sdpa_computes():
    m = Attention().eval()
    qg = capture(m, (3, 8, 8), QuantPlan.uniform(BitConfig(8, 8)))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    from qcli.quant.capture import set_float

    set_float(qg)
    with torch.no_grad():
        assert torch.allclose(qg(x), m(x), atol=1e-5)


def test_shapes_that_follow_the_batch_are_computed_at_run_time():
    """The class token's expand(B, ...) and the reshape(B, N, ...) use the batch of the
    input the file is given, not the batch capture traced."""
    qg, x = _calibrated(Attention(), (3, 8, 8))
    model = to_onnx(qg)
    full = _ort(model, x)
    for batch in (1, 4):
        assert np.allclose(_ort(model, x[:batch]), full[:batch], atol=1e-6)


def test_attention_softmax_scale():
    s = torch.randn(2, 3, 4)
    want = torch.softmax(s / math.sqrt(8.0), -1)
    from qcli.quant.ops import attention_softmax

    assert torch.allclose(attention_softmax(s, 1 / math.sqrt(8.0)), want, atol=1e-7)


def test_a_conv_subclass_with_another_function_is_not_taken_for_a_conv():
    """timm's StdConv2d standardizes its weights in forward: treating it as a plain conv
    would change the model silently, so it is traced through instead."""
    from timm.layers import StdConv2d

    from qcli.quant import ops

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = StdConv2d(3, 4, 3)
            self.plain = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.plain(self.conv(x)).mean((2, 3))

    net = Net()
    assert ops.module_op(net.conv) is None
    assert ops.module_op(net.plain) == "conv"
    from qcli.quant.capture import set_float

    qg = capture(net.eval(), (3, 8, 8), QuantPlan.uniform(BitConfig(8, 8)))
    set_float(qg)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(qg(x), net(x), atol=1e-5)


# -- what the CLI says ------------------------------------------------------------------------

VIT = "builtin:vit_cifar10"


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vit") / "vit.pt"
    torch.save(build_architecture(VIT).module.state_dict(), path)
    return path


def test_show_float_lists_the_float_ops_without_data(vit_weights):
    code, out, err = run("calibrate", VIT, "--weights", vit_weights, "--show-float", "--json")
    assert code == 0, err
    report = json.loads(out)["ops"]
    # the last residual add feeds only the final LayerNorm: it runs in float too
    assert set(report["float_ops"]) == {"layer_norm", "attention_softmax", "gelu", "add"}
    assert report["float_ops"]["layer_norm"] == len(
        [n for n in report["float_nodes"] if n.endswith("layer_norm")]
    )
    assert report["integer_ops"] > 0


def test_strict_refuses_a_model_with_float_ops(vit_weights, images, tmp_path):
    out = tmp_path / "v.qcli"
    code, _, err = run(
        "calibrate", VIT, "--weights", vit_weights, "--data", images, "--strict",
        "--method", "minmax", "--out", out,
    )  # fmt: skip
    assert code == 1
    assert "--strict" in err and "layer_norm" in err and "Traceback" not in err
    assert not out.exists()


def test_bn_tuning_is_skipped_with_a_note_without_batchnorm(vit_weights, images, tmp_path):
    out = tmp_path / "v.qcli"
    code, stdout, err = run(
        "calibrate", VIT, "--weights", vit_weights, "--data", images, "--bn-tune",
        "--method", "minmax", "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    assert "no BatchNorm" in json.loads(stdout)["tuning"]["bn_tune_skipped"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ops"]["float_ops"]["gelu"] == 6


def test_quantize_without_data_names_what_works_for_a_model_without_batchnorm(
    vit_weights, tmp_path
):
    out = tmp_path / "q"
    code, _, err = run("quantize", VIT, "--weights", vit_weights, "--out", out)
    assert code == 2
    assert "no BatchNorm" in err and "--data" in err and "--gen-method noise" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("signed", [False, True])
def test_pair_sum_check_covers_activation_matmuls(signed):
    """q·kᵀ and attention·v multiply two activations: uint8 × uint8 never saturates, but a
    signed activation grid makes them products whose int16 pair sums can (a static check of
    the file, whatever CPU runs the suite)."""
    from qcli.export.kernels import pair_sum_violations
    from qcli.quant.plan import QuantPlan

    qg = capture(Attention().eval(), (3, 8, 8), QuantPlan(signed_activations=signed))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, [x], "minmax")
    fit_bias_grids(qg)
    flagged = {v.node for v in pair_sum_violations(to_onnx(qg))}
    matmul = {"matmul_1"}  # attention·v; q·kᵀ feeds the float softmax from float scores
    assert (matmul <= flagged) == signed


class UpsampleHead(nn.Module):
    """nn.Upsample is outside the op table: exported by torch's own ONNX exporter (Resize)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(4, 5, 3)

    def forward(self, x):
        return self.head(self.up(F.relu(self.conv(x)))).mean((2, 3))


class LSTMHead(nn.Module):
    """nn.LSTM returns (y, (h, c)): a nested tuple, picked apart by indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y, (h, _) = self.lstm(self.conv(x).flatten(2).permute(0, 2, 1))
        return self.head(y[:, -1] + h[0])


@pytest.mark.parametrize("net", [UpsampleHead, LSTMHead], ids=["upsample", "lstm"])
def test_unknown_modules_export_through_the_fallback(net):
    qg, x = _calibrated(net(), (3, 4, 4))
    assert qg.op_report()["float_ops"]
    _agrees(qg, x)
