"""The export's sim-vs-onnxruntime verdict: near-tie flips pass, real disagreements fail."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from torch import nn

from qcli.export.onnx_qdq import to_onnx
from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.quant.capture import QuantGraph, capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from qcli.stages.export import agreement_report, compare_with_simulation


def _logits() -> torch.Tensor:
    return torch.tensor([[10.0, 0.0, 1.0], [5.0, 4.99, 0.0], [0.0, 3.0, 9.0]])


def test_identical_outputs_pass():
    r = agreement_report(_logits(), _logits())
    assert r["ok"] and r["disagreement_pct"] == 0 and r["max_abs_diff"] == 0


def test_flip_between_near_tied_classes_passes_but_is_reported():
    ort = _logits().clone()
    ort[1, 1] = 5.02  # class 1 overtakes class 0 by 0.02: a one-LSB story
    r = agreement_report(_logits(), ort)
    assert r["ok"] and r["decisive_flips"] == 0
    assert abs(r["disagreement_pct"] - 100 / 3) < 1e-4


def test_decisive_flip_fails():
    ort = _logits().clone()
    ort[0, 2] = 10.5  # the sim was sure of class 0 (margin 9); onnxruntime says class 2
    r = agreement_report(_logits(), ort)
    assert not r["ok"] and r["decisive_flips"] == 1


def test_large_logit_error_fails_without_a_flip():
    ort = _logits().clone()
    ort[2] += torch.tensor([0.0, 0.0, 3.0])  # 3 > 10% of the range 10
    assert not agreement_report(_logits(), ort)["ok"]


def test_flip_within_a_few_logit_steps_passes_when_the_logits_are_tiny():
    step = 1e-10  # logits spanning 3 steps: 5% of the range is a sixth of one step
    sim = step * torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 3.0]])
    ort = sim.clone()
    ort[0, 1] += 2.5 * step  # a flip against a margin of 2 steps
    assert not agreement_report(sim, ort)["ok"]  # the range alone refuses it
    r = agreement_report(sim, ort, logit_step=step)
    assert r["ok"] and r["decisive_flips"] == 0 and r["logit_step"] == step
    ort[0, 1] += 20 * step  # far beyond the floor of MIN_LOGIT_STEPS steps
    assert not agreement_report(sim, ort, logit_step=step)["ok"]


class _TinyLogits(nn.Module):
    """Logits of ~1e-8, spanning ~15 logit steps, as in an untrained network whose activations
    decayed (a random-init mobilenet_v3_small's logits span 9e-10): the hidden layer's weights
    are x1e-7, so the classifier's input quantizer sits at its smallest scale (1e-8), and the
    classifier has no bias (torchvision's init)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.hidden = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.hidden.weight.mul_(1e-7)
            self.hidden.bias.mul_(1e-7)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(torch.relu(self.hidden(x)))


@pytest.fixture(scope="module")
def tiny() -> tuple[QuantGraph, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16)
    qg = capture(_TinyLogits().eval(), (3, 16, 16), QuantPlan.uniform(BitConfig.parse("w8a8")))
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, [x], "minmax")
    return qg, x


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("steps, ok", [(0, True), (1, True), (3, True), (30, False)])
def test_tiny_logits_are_judged_in_logit_steps(
    tmp_path: Path, tiny: tuple[QuantGraph, torch.Tensor], steps: int, ok: bool
):
    """The file is written with one class's bias moved by `steps` logit steps: within a few
    steps it computes what the simulation computes (one-step flips move the logits this much),
    30 steps off it does not. Without the floor, 1 step is 7% of this range: refused."""
    qg, x = tiny
    shifted = copy.deepcopy(qg)
    with torch.no_grad():
        fc = qg.module.fc
        w = fc.quantized_weight().abs()
        step = float(fc.input_quantizer.scale * w.max())  # s_in x max|w|
        shifted.module.fc.bias[int(w.amax(1).argmax())] += steps * step
    path = tmp_path / "tiny.onnx"
    onnx.save(to_onnx(shifted, "int8"), str(path))
    check = compare_with_simulation(SimpleNamespace(graph=qg), path, x)
    assert all(r["ok"] == ok for r in check["runs"].values()), check
    assert check["logit_range"] < 20 * step < 1e-6  # tiny logits, a few steps wide
    assert check["logit_step"] == pytest.approx(step)
    if steps:
        assert check["max_abs_diff"] == pytest.approx(steps * step, rel=0.01)
