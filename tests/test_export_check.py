"""The export's sim-vs-onnxruntime verdict: near-tie flips pass, real disagreements fail."""

from __future__ import annotations

import torch

from qcli.stages.export import agreement_report


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
