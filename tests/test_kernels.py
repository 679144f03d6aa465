"""Exported files compute the same on every CPU: no int16 pair sum of onnxruntime's u8×s8
kernels can saturate (x86 without VNNI), checked statically and, where the CPU saturates,
by running the worst case.

The worst-case layer: a 1×1 conv over 16 channels fed uint8 code 255 on every channel. Its
first output channel has every weight at the top of its grid (127 at full range), so each
pair of products sums to 255·254 = 64,770 on a full-range file: an AVX2-only CPU clips that
at 32,767 and returns about half the value. Its second channel has one weight (a pair sum of
255·127 = 32,385, which fits) and a value between the true and the saturated first one, so
saturation changes the top-1 class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qcli.evaluate import KernelCheck, OrtModel
from qcli.export import kernels
from qcli.export.onnx_qdq import to_onnx
from qcli.methods.int8_range import (
    WidenSettings,
    apply_widened,
    narrowed_layers,
    widen_sensitive_layers,
    widened,
)
from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.quant.capture import capture
from qcli.quant.plan import WEIGHT_SUFFIX, QuantPlan
from qcli.quant.spec import SAFE_INT8_LIMIT, BitConfig, QuantSpec, weight_spec

SATURATES_HERE = kernels.saturates(kernels.cpu_kernel_class())
NEEDS_SATURATING_CPU = pytest.mark.skipif(
    not SATURATES_HERE,
    reason=f"this CPU ({kernels.cpu_kernel_class()}) accumulates u8×s8 in int32: "
    "nothing can saturate here (the static checks cover it)",
)


def test_kernel_class_from_flags():
    x86 = "x86_64"
    assert kernels.kernel_class_from_flags({"avx2", "fma"}, x86) == kernels.AVX2
    assert kernels.kernel_class_from_flags({"avx2", "avx512bw"}, x86) == kernels.AVX512
    assert kernels.kernel_class_from_flags({"avx2", "avx512bw", "avx512_vnni"}, x86) == (
        kernels.AVX512_VNNI
    )
    assert kernels.kernel_class_from_flags({"avx2", "avx_vnni"}, x86) == kernels.AVX_VNNI
    assert kernels.kernel_class_from_flags({"avx512_vnni", "amx_int8"}, x86) == kernels.AMX
    assert kernels.kernel_class_from_flags({"asimd", "asimddp"}, "aarch64") == kernels.ARM_DOT
    assert kernels.kernel_class_from_flags({"asimd"}, "aarch64") == kernels.ARM
    assert kernels.kernel_class_from_flags(set(), x86) == kernels.OTHER
    for cls in (kernels.AVX2, kernels.AVX512, kernels.OTHER):
        assert kernels.saturates(cls)
    for cls in (kernels.AVX512_VNNI, kernels.AVX_VNNI, kernels.AMX, kernels.ARM_DOT):
        assert not kernels.saturates(cls)


def test_max_pair_sum_takes_the_two_largest_magnitudes_of_each_channel():
    w = np.array([[127, -127, 0, 1], [10, 20, -30, 5]], dtype=np.int8)
    assert kernels.max_pair_sum(w) == 255 * 254
    assert kernels.max_pair_sum(w, act_max=15) == 15 * 254
    assert kernels.max_pair_sum(np.array([[64, -64, 64]], dtype=np.int8)) == 32640  # fits
    assert kernels.max_pair_sum(np.array([[127], [3]], dtype=np.int8)) == 255 * 127
    # a 4-D conv weight: channels on axis 0
    conv = np.zeros((2, 3, 3, 3), dtype=np.int8)
    conv[1, 0, 0, 0], conv[1, 2, 2, 2] = -100, 90
    assert kernels.max_pair_sum(conv) == 255 * 190


def test_quant_spec_limit_narrows_the_grid_and_round_trips():
    s = weight_spec(8, limit=SAFE_INT8_LIMIT)
    assert (s.qmin, s.qmax) == (-64, 64)
    assert kernels.max_pair_sum(np.array([[s.qmin, s.qmin]])) <= kernels.INT16_MAX
    assert QuantSpec.from_dict(s.to_dict()) == s
    old = {"bits": 8, "signed": True, "symmetric": True, "per_channel": True}  # older .qcli
    assert QuantSpec.from_dict(old) == weight_spec(8)
    assert (weight_spec(8).qmin, weight_spec(8).qmax) == (-128, 127)
    with pytest.raises(ValueError):
        weight_spec(4, limit=64)  # does not narrow a 4-bit grid


class Mixed(nn.Module):
    """A regular conv, a depthwise conv, a grouped conv and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.dw(torch.relu(self.conv(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(
    ("bits", "int8_range", "narrowed"),
    [
        ("w8a8", "safe", {"conv", "grouped", "fc"}),  # the depthwise conv does not pair
        ("w8a8", "full", set()),
        ("w4a8", "safe", set()),  # 4-bit weights: 255 · (7 + 7) fits
        ("w8a4", "safe", set()),  # 4-bit activations: 15 · (127 + 127) fits
    ],
)
def test_safe_range_narrows_exactly_the_layers_that_could_saturate(bits, int8_range, narrowed):
    qg = capture(
        Mixed().eval(), (3, 8, 8), QuantPlan.uniform(BitConfig.parse(bits), int8_range=int8_range)
    )
    got = {n for n, layer in qg.layers() if layer.weight_quantizer.spec.limit is not None}
    assert got == narrowed


# -- the worst-case layer, exported --------------------------------------------------------


class WorstCase(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0] = 1.0  # every weight at the top of its channel's grid
            self.conv.weight[1, 0] = 12.0  # one weight: 255 · 127 fits int16

    def forward(self, x):
        return self.conv(x).mean((2, 3))


X = torch.ones(4, 16, 4, 4)  # uint8 code 255 on every input channel


def worst_case(int8_range: str, layer_specs=None) -> tuple:
    specs = {f"{k}.weight_quantizer": v for k, v in (layer_specs or {}).items()}
    qg = capture(WorstCase().eval(), (16, 4, 4), QuantPlan(int8_range=int8_range, specs=specs))
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, [X], "minmax")
    with torch.no_grad():
        sim = qg(X)
    return qg, to_onnx(qg), sim


def _ort(model: onnx.ModelProto, path: Path, optimize: bool) -> torch.Tensor:
    onnx.save(model, str(path))
    return OrtModel(path, optimize=optimize)(X)


def _weight_dtype(model: onnx.ModelProto) -> int:
    (w,) = [i for i in model.graph.initializer if i.name == "conv_weight_int"]
    return w.data_type


def test_worst_case_layer_is_exact_with_integer_kernels_on_any_cpu(tmp_path):
    qg, model, sim = worst_case("safe")
    assert kernels.pair_sum_violations(model) == []
    assert _weight_dtype(model) == onnx.TensorProto.INT8
    step = float(dict(qg.act_quantizers())["act_quant.conv"].scale)
    fused = _ort(model, tmp_path / "m.onnx", optimize=True)
    reference = _ort(model, tmp_path / "r.onnx", optimize=False)
    assert sim[0, 0] > sim[0, 1] + 1  # the saturating channel is the top-1 class
    assert torch.allclose(fused, sim, atol=0.51 * step), (fused, sim)
    assert torch.allclose(reference, sim, atol=0.51 * step)
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta["qcli_exact_on"].split(",")) == set(kernels.ALL_CLASSES)


def test_full_grid_layer_is_stored_unsigned_and_exact_on_any_cpu(tmp_path):
    """Under the safe range, a layer that keeps the full 8-bit grid goes to the file as
    uint8 weights (zero point 128): u8×u8 kernels widen to int16 and cannot saturate."""
    qg, model, sim = worst_case("safe", layer_specs={"conv": weight_spec(8)})
    assert int(qg.module.conv.weight_quantizer.quantize_int(qg.module.conv.weight).max()) == 127
    assert _weight_dtype(model) == onnx.TensorProto.UINT8
    assert kernels.pair_sum_violations(model) == []
    step = float(dict(qg.act_quantizers())["act_quant.conv"].scale)
    fused = _ort(model, tmp_path / "m.onnx", optimize=True)
    assert torch.allclose(fused, sim, atol=0.51 * step), (fused, sim)


def test_full_range_file_is_flagged_by_the_static_check_on_any_cpu(tmp_path):
    qg, model, sim = worst_case("full")
    (v,) = kernels.pair_sum_violations(model)
    assert v.node == "conv" and v.worst_pair_sum == 255 * 254
    meta = {p.key: p.value for p in model.metadata_props}
    assert kernels.AVX2 not in meta["qcli_exact_on"].split(",")
    step = float(dict(qg.act_quantizers())["act_quant.conv"].scale)
    reference = _ort(model, tmp_path / "r.onnx", optimize=False)
    assert torch.allclose(reference, sim, atol=0.51 * step)


@NEEDS_SATURATING_CPU
def test_full_range_file_saturates_on_this_cpu(tmp_path):
    _, model, sim = worst_case("full")
    fused = _ort(model, tmp_path / "m.onnx", optimize=True)
    assert float(fused[0, 0]) < 0.75 * float(sim[0, 0])  # clipped at 32,767 per pair


@NEEDS_SATURATING_CPU
def test_kernel_check_tells_a_safe_file_from_a_saturating_one(tmp_path):
    changed = {}
    for int8_range in ("safe", "full"):
        _, model, _ = worst_case(int8_range)
        path = tmp_path / f"{int8_range}.onnx"
        onnx.save(model, str(path))
        check = KernelCheck(OrtModel(path))
        check(X)
        changed[int8_range] = check.to_dict()["changed_pct"]
    assert changed == {"safe": 0.0, "full": 100.0}


def test_kernel_check_counts_images_whose_class_changes(tmp_path):
    """The counting itself, on any CPU: a stand-in 'integer kernel' that flips two images."""
    _, model, _ = worst_case("safe")
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    check = KernelCheck(OrtModel(path))
    real = check.fused
    check.fused = lambda x: torch.cat([real(x)[:2].flip(1), real(x)[2:]])
    check(X)
    assert check.to_dict() == {"images": 4, "changed": 2, "changed_pct": 50.0}


# -- widening the sensitive layers -----------------------------------------------------------


def _calibrated_mixed(seed: int = 0):
    torch.manual_seed(seed)
    qg = capture(Mixed().eval(), (3, 8, 8), QuantPlan.uniform(BitConfig(8, 8)))
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, [x], "minmax")
    return qg, x


@pytest.mark.parametrize("share", [0.0, 0.05, 0.5, 1.0])
def test_widening_stays_within_its_multiply_add_budget(share):
    qg, x = _calibrated_mixed()
    before = {n for n, _ in narrowed_layers(qg)}
    plan, report = widen_sensitive_layers(
        qg, x, "minmax", WidenSettings(mac_share=share, min_kl=-1.0)
    )
    chosen = set(report["widened"])
    assert report["mac_share"] <= share + 1e-9
    assert chosen <= before
    changed = apply_widened(qg, plan, "minmax")
    assert set(changed) == {f"{n}.weight_quantizer" for n in chosen}
    after = {n for n, _ in narrowed_layers(qg)}
    assert after == before - chosen  # exactly the chosen layers lost their limit
    assert qg.plan == capture(Mixed().eval(), (3, 8, 8), qg.plan).plan  # a reload rebuilds it
    if share == 1.0:
        assert chosen == before  # no KL threshold and the whole budget: all fit
    if share == 0.0:
        assert chosen == set()
    for name, layer in qg.layers():
        if name in chosen:
            ints = layer.weight_quantizer.quantize_int(layer.weight)
            assert int(ints.abs().max()) == 127  # the full grid, ranges set afresh


@pytest.mark.parametrize("exact", [0, 2])
def test_widening_picks_the_layer_whose_narrowing_moves_the_output(exact):
    """A layer whose largest weights carry the output: narrowing it to ±64 costs resolution
    where it matters, so it is the one widened when the budget allows one; the one-pass
    estimate alone (exact=0) ranks it first too."""
    qg, x = _calibrated_mixed()
    layers = dict(qg.layers())
    with torch.no_grad():  # fc: one large weight per row and many small ones that matter
        w = torch.randn_like(layers["fc"].weight) * 0.05
        w[:, 0] = 1.0
        layers["fc"].weight.copy_(w)
    set_weight_ranges(qg, "minmax")
    _, report = widen_sensitive_layers(qg, x, "minmax", WidenSettings(mac_share=1.0, exact=exact))
    ranked = list(report["kl_if_widened"])
    assert ranked[0] == "fc", report["kl_if_widened"]
    assert len(report["kl_measured"]) == exact


def test_widening_returns_a_plan_and_leaves_the_graph_alone_until_it_is_applied():
    """The pass tries widened grids only inside `widened` (which restores them) and hands
    back a plan: every quantizer's spec, scale and zero point are as they were, bit for bit,
    until `apply_widened` gives the graph that plan through the resolver."""
    qg, x = _calibrated_mixed()
    state = {k: v.clone() for k, v in qg.module.state_dict().items()}
    specs = {n: q.spec for n, q in qg.quantizers()}
    base = qg.base_plan
    settings = WidenSettings(mac_share=1.0, min_kl=-1.0)
    plan, report = widen_sensitive_layers(qg, x, "minmax", settings)
    assert report["widened"] and qg.base_plan == base
    assert {n: q.spec for n, q in qg.quantizers()} == specs
    after = qg.module.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert plan == base.widened(report["widened"])
    apply_widened(qg, plan, "minmax")
    assert qg.base_plan == plan
    assert {n for n, q in qg.quantizers() if q.spec != specs[n]} == {
        f"{n}.weight_quantizer" for n in report["widened"]
    }


def test_trying_a_widened_grid_restores_the_graph_even_on_an_error():
    qg, _ = _calibrated_mixed()
    (name, layer), *_ = narrowed_layers(qg)
    wq = layer.weight_quantizer
    spec, scale = wq.spec, wq.scale.detach().clone()
    with pytest.raises(RuntimeError), widened(qg, [name], "minmax"):
        assert wq.spec.limit is None and qg.base_plan.spec(f"{name}.weight_quantizer")
        raise RuntimeError("measurement failed")
    assert wq.spec == spec and torch.equal(wq.scale, scale)
    assert qg.base_plan.spec(f"{name}.weight_quantizer") is None


class Deep(nn.Module):
    """Twelve 3x3 convs and a linear: thirteen layers the safe range narrows."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(12)
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def test_widening_costs_a_fixed_number_of_forwards_not_one_per_layer():
    """The pass once ran the model once per narrowed layer (9 minutes of ResNet-50's
    calibrate): now one forward for the multiply-adds (1 image), the estimate's forward
    (with its backward passes) and `exact` + 1 forwards, however many layers there are.
    Counted as images through the first layer, which only a whole-model forward runs."""
    torch.manual_seed(0)
    qg = capture(Deep().eval(), (3, 8, 8), QuantPlan.uniform(BitConfig(8, 8)))
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, [x], "minmax")
    cands = narrowed_layers(qg)
    assert len(cands) == 13
    seen = []
    first = dict(qg.layers())["convs.0"]
    handle = first.register_forward_hook(lambda m, a, y: seen.append(y.shape[0]))
    settings = WidenSettings(mac_share=0.5, min_kl=-1.0)
    try:
        _, report = widen_sensitive_layers(qg, x, "minmax", settings)
    finally:
        handle.remove()
    forwards = (sum(seen) - 1) / len(x)  # full-batch forwards after layer_macs' one image
    assert forwards <= 1 + settings.exact + 1, seen
    assert len(report["kl_if_widened"]) == len(cands)  # yet every layer was ranked
    assert 0 < report["mac_share"] <= 0.5


def test_calibrate_records_widened_layers_and_export_stores_them_unsigned(
    tmp_path: Path, weights: Path, images: Path
):
    from click.testing import CliRunner

    from qcli.cli import cli
    from qcli.stages.common import load_qmodel

    out = tmp_path / "r20.qcli"
    args = ["calibrate", "builtin:resnet20_cifar10", "--weights", weights, "--data", images]
    args += ["--bits", "w8a8", "--method", "minmax", "--out", out]
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    widened = set(manifest["metrics"]["int8_range"]["widened"])
    specs = manifest["plan"]["specs"].items()
    limits = {
        k.removesuffix(WEIGHT_SUFFIX): s["limit"] for k, s in specs if k.endswith(WEIGHT_SUFFIX)
    }
    assert {n for n, lim in limits.items() if lim is None} == widened
    assert all(limits[n] == SAFE_INT8_LIMIT for n in limits if n not in widened)
    # the reloaded simulation is built from the recorded specs, not from the defaults
    qg = load_qmodel(out).graph
    assert {n: layer.weight_quantizer.spec.limit for n, layer in qg.layers()} == limits
    model = to_onnx(qg)
    assert kernels.pair_sum_violations(model) == []
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    for name in limits:
        want = onnx.TensorProto.UINT8 if name in widened else onnx.TensorProto.INT8
        assert dtypes[name.replace(".", "_") + "_weight_int"] == want, name


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_the_widening_budget_flag_reaches_the_pass(
    tmp_path: Path, weights: Path, images: Path, share: float
):
    """--int8-widen-share is the pass's multiply-add budget: 0 widens nothing, a larger one
    may spend more than the default's, never over its own."""
    from click.testing import CliRunner

    from qcli.cli import cli

    out = tmp_path / "r20.qcli"
    args = ["calibrate", "builtin:resnet20_cifar10", "--weights", weights, "--data", images]
    args += ["--bits", "w8a8", "--method", "minmax", "--out", out]
    res = CliRunner().invoke(cli, [str(a) for a in [*args, "--int8-widen-share", share]])
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "manifest.json").read_text())["metrics"]["int8_range"]
    assert report["mac_budget"] == share and report["mac_share"] <= share
    if share == 0.0:
        assert report["widened"] == []


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--int8-range", "full"], "--int8-range safe"),
        (["--bits", "w4a8"], "8-bit weights"),
    ],
)
def test_the_widening_budget_is_refused_where_nothing_is_narrowed(
    tmp_path: Path, weights: Path, images: Path, extra: list[str], why: str
):
    from click.testing import CliRunner

    from qcli.cli import cli

    args = ["calibrate", "builtin:resnet20_cifar10", "--weights", weights, "--data", images]
    args += ["--method", "minmax", "--out", tmp_path / "x.qcli", "--int8-widen-share", 0.3]
    res = CliRunner().invoke(cli, [str(a) for a in [*args, *extra]])
    assert res.exit_code == 2 and why in res.output + res.stderr, res.output
    assert not (tmp_path / "x.qcli").exists()


def _qdq_gemm(w: np.ndarray, trans_b: int) -> onnx.ModelProto:
    """uint8-quantized input -> Gemm with int8 QDQ weights `w` (as stored)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
        numpy_helper.from_array(w.astype(np.int8), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
        helper.make_node("Gemm", ["xd", "wd"], ["y"], name="gemm", transB=trans_b),
    ]
    k = w.shape[1] if trans_b else w.shape[0]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_static_check_reads_gemm_weights_by_output_channel():
    """Pairs run along the inputs of one output: a (in, out) weight is read by columns."""
    w = np.array([[127, 127], [0, 0]])
    assert [v.node for v in kernels.pair_sum_violations(_qdq_gemm(w, trans_b=1))] == ["gemm"]
    assert kernels.pair_sum_violations(_qdq_gemm(w, trans_b=0)) == []  # columns: 127 + 0
