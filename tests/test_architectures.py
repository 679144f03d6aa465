"""The architecture matrix: every family a practitioner brings goes through capture, range
calibration, the ONNX writer, the static pair-sum check and the simulation == onnxruntime gate
(reference arithmetic and integer kernels), at W8A8 and W4A8.

Models are random-init (nothing is downloaded) at the smallest input they accept. Random init
leaves a transformer's class token and position embedding at ~1e-6 and 0.02, which no trained
model has: LayerNorm then divides a near-zero vector by its near-zero spread, so one float
rounding flip upstream becomes dozens of steps at the logits. They are redrawn at unit scale,
as training makes them (see `_untie_degenerate_tokens`).
"""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from qcli.export import kernels
from qcli.export.onnx_qdq import to_onnx
from qcli.methods.range_setting import fit_bias_grids, set_activation_ranges, set_weight_ranges
from qcli.models.builtin import build_architecture
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from qcli.stages.export import compare_with_simulation

pytestmark = pytest.mark.usefixtures("one_thread")

# (MODEL, smallest input side, ops expected to stay in float)
MATRIX = [
    ("timm:resnet18", 32, set()),
    ("timm:resnet50", 32, set()),
    ("timm:mobilenetv2_100", 32, set()),
    ("timm:mobilenetv3_small_100", 32, {"hardswish", "hardsigmoid"}),
    ("timm:efficientnet_b0", 32, {"silu"}),
    ("timm:regnetx_002", 32, set()),
    # a stage's last residual add and the pooling feed only LayerNorms: float as well
    ("timm:convnext_atto", 32, {"layer_norm", "gelu", "add", "adaptive_avgpool"}),
    ("timm:vit_tiny_patch16_224", 224, {"layer_norm", "attention_softmax", "gelu", "add"}),
    ("timm:deit_tiny_patch16_224", 224, {"layer_norm", "attention_softmax", "gelu", "add"}),
    # the relative-position bias and window-mask adds feed only the softmax
    ("timm:swin_tiny_patch4_window7_224", 224, {"layer_norm", "softmax", "gelu", "add"}),
    # pre-activation BN, nothing to fold it into; the concat feeding it stays float too
    ("timm:densenet121", 32, {"batchnorm", "cat"}),
    ("timm:ghostnet_100", 32, {"hardsigmoid"}),
    ("torchvision:mobilenet_v3_small", 32, {"hardswish", "hardsigmoid"}),
    ("torchvision:shufflenet_v2_x0_5", 32, set()),
    ("torchvision:resnet50", 32, set()),
]
SLOW = {"timm:swin_tiny_patch4_window7_224", "timm:densenet121", "timm:resnet50"}


def _untie_degenerate_tokens(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g))


def _images(n: int, side: int) -> torch.Tensor:
    """Smooth random images (upsampled noise): ranges like a photo's, not white noise."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(n, 3, max(side // 8, 2), max(side // 8, 2), generator=g)
    return F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)


def _row(spec: str, side: int, bits: str, tmp_path) -> tuple[dict, dict]:
    module = build_architecture(spec).module.eval()
    _untie_degenerate_tokens(module)
    qg = capture(module, (3, side, side), QuantPlan.uniform(BitConfig.parse(bits)))
    x = _images(12, side)
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, [x[:8]], "minmax")
    fit_bias_grids(qg)
    model = to_onnx(qg)
    onnx.checker.check_model(model, full_check=True)
    assert kernels.pair_sum_violations(model) == []
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with torch.no_grad():
        check = compare_with_simulation(types.SimpleNamespace(graph=qg), path, x)
    return qg.op_report(), check


@pytest.mark.parametrize(
    ("spec", "side", "float_ops"),
    [pytest.param(*row, marks=pytest.mark.slow if row[0] in SLOW else ()) for row in MATRIX],
    ids=[row[0] for row in MATRIX],
)
@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_architecture_exports_and_passes_the_gate(spec, side, float_ops, bits, tmp_path):
    report, check = _row(spec, side, bits, tmp_path)
    assert set(report["float_ops"]) == float_ops
    assert report["integer_ops"] >= report["compute_ops"] / 2
    assert report["float_leaves"] == []
    for arithmetic, run in check["runs"].items():
        assert run["ok"], (arithmetic, run)
    assert np.isfinite(check["max_abs_diff"])
