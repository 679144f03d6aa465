"""The quantization plan: one value from flags or bits.json to capture, the .qcli and back."""

from __future__ import annotations

import json

import pytest
import torch

from qcli.errors import QcliError, UsageError
from qcli.models import resnet20
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import SAFE_INT8_LIMIT, BitConfig, weight_spec
from qcli.stages.calibrate import CalibrateConfig, calibrate
from qcli.stages.common import DataOptions, ModelOptions, load_qmodel
from qcli.ui import SilentUI

pytestmark = pytest.mark.usefixtures("one_thread")

R20 = "builtin:resnet20_cifar10"


def _r20():
    torch.manual_seed(0)
    return resnet20().eval()


def test_plan_json_round_trip_and_equality():
    plan = QuantPlan(4, 8, keep_fp=("linear",)).with_bits(
        weights={"layer1.0.conv1": 2, "conv1": 8}, activations={"act_quant.x": 4}
    )
    back = QuantPlan.from_json(plan.to_json())
    assert back == plan and hash(back) == hash(plan)
    with_input = QuantPlan(4, 4, input_bits=8)
    assert QuantPlan.from_json(with_input.to_json()) == with_input != QuantPlan(4, 4)
    # insertion order does not matter: the plan is a value
    assert QuantPlan(weights={"a": 2, "b": 3}) == QuantPlan(weights={"b": 3, "a": 2})
    assert plan.layer_weight_bits("layer1.0.conv1") == 2 and plan.layer_weight_bits("x") == 4


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"wieght_bits": 4}, "wieght_bits"),
        ({"weights": {"layer1.0.conv1": 9}}, "layer1.0.conv1"),
        ({"activations": {"act_quant.x": "4"}}, "act_quant.x"),
        ({"input_bits": 12}, "input_bits"),
        ({"int8_range": "wide"}, "int8_range"),
        ({"specs": {"conv1.weight_quantizer": {"bits": 4}}}, "conv1.weight_quantizer"),
    ],
)
def test_plan_validation_names_the_bad_entry(patch, named):
    d = {**QuantPlan(4, 8).to_dict(), **patch}
    with pytest.raises(UsageError, match=named.replace(".", r"\.")):
        QuantPlan.from_json(json.dumps(d))


def test_capture_follows_a_mixed_plan():
    plan = QuantPlan(4, 8).with_bits(weights={"conv1": 8, "layer1.0.conv2": 2})
    qg = capture(_r20(), (3, 32, 32), plan)
    layers = dict(qg.layers())
    assert layers["layer1.0.conv2"].weight_quantizer.spec == weight_spec(2)
    assert layers["layer1.0.conv1"].weight_quantizer.spec == weight_spec(4)
    # an 8-bit layer still gets the saturation-safe grid of its 8-bit input
    assert layers["conv1"].weight_quantizer.spec == weight_spec(8, limit=SAFE_INT8_LIMIT)
    act = next(name for name, _ in qg.act_quantizers())
    qg4 = capture(_r20(), (3, 32, 32), plan.with_bits(activations={act: 4}))
    assert dict(qg4.act_quantizers())[act].spec.bits == 4
    # the graph's plan rebuilds it exactly
    again = capture(_r20(), (3, 32, 32), qg4.plan)
    assert again.plan == qg4.plan


def test_plan_naming_unknown_layers_is_an_error():
    with pytest.raises(QcliError, match="no_such"):
        capture(_r20(), (3, 32, 32), QuantPlan(weights={"no_such": 4}))
    with pytest.raises(QcliError, match=r"act_quant\.no_such"):
        capture(_r20(), (3, 32, 32), QuantPlan(activations={"act_quant.no_such": 4}))
    with pytest.raises(UsageError, match="conv1"):
        QuantPlan(keep_fp=("conv1",), weights={"conv1": 4})


def test_reloaded_qcli_has_the_plan_it_was_saved_with(tmp_path, weights, images):
    plan = QuantPlan.uniform(BitConfig(4, 8), keep_fp=("linear",)).with_bits(
        weights={"layer1.0.conv1": 2, "layer3.2.conv2": 8}
    )
    out = tmp_path / "m.qcli"
    cfg = CalibrateConfig(
        ModelOptions(R20, str(weights)),
        DataOptions(images, batch_size=16),
        out,
        method="minmax",
        plan=plan,
    )
    calibrate(cfg, SilentUI())
    manifest = json.loads((out / "manifest.json").read_text())
    saved = QuantPlan.from_dict(manifest["plan"])
    qm = load_qmodel(out)
    assert qm.graph.plan == saved
    assert qm.graph.base_plan.weights == plan.weights and qm.graph.keep_fp == ("linear",)
    layers = dict(qm.graph.layers())
    assert layers["layer1.0.conv1"].weight_quantizer.spec.bits == 2
    assert layers["linear"].weight_quantizer is None
