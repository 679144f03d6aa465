"""A `.qcli` folder rebuilds the very simulation that was calibrated in memory.

`qcli calibrate` ends with the quantized graph in memory; `export` and `eval` see only what
`load_qmodel` rebuilds from the folder. Every method (with BN tuning, which rewrites weights,
biases and weight scales after the method) must survive the round trip bit for bit: the same
quantizer specs, scales, zero points, weights and biases, the same forward state (no learned
rounding or QDrop left attached), and torch.equal logits on the same input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qcli.stages.calibrate as calibrate_stage
from qcli.quant.capture import QuantGraph, set_float
from qcli.quant.spec import BitConfig
from qcli.stages.calibrate import CalibrateConfig, calibrate
from qcli.stages.common import DataOptions, ModelOptions, load_qmodel
from qcli.ui import SilentUI

pytestmark = pytest.mark.usefixtures("one_thread")

R20 = "builtin:resnet20_cifar10"


def _calibrate_in_memory(
    monkeypatch: pytest.MonkeyPatch, cfg: CalibrateConfig
) -> tuple[QuantGraph, dict]:
    """Run the calibrate stage and keep the graph it saves (the stage itself, unchanged)."""
    kept: list[QuantGraph] = []
    real_save = calibrate_stage.save_qmodel

    def keep(path, qg, loaded, extra, force):
        kept.append(qg)
        real_save(path, qg, loaded, extra, force)

    monkeypatch.setattr(calibrate_stage, "save_qmodel", keep)
    result = calibrate(cfg, SilentUI())
    assert len(kept) == 1
    return kept[0], result


def _forward_state(qg: QuantGraph) -> dict[str, tuple]:
    """What a quantizer does on forward beyond its tensors."""
    return {
        name: (q.spec, q.mode, q.observer is None, q.rounding is None, q.drop_prob)
        for name, q in qg.quantizers()
    }


@pytest.mark.parametrize(
    ("method", "bits"),
    [
        ("minmax", "w4a8"),
        ("minmax", "w8a8"),  # the int8 range pass: narrowed grids, maybe widened layers
        ("adaround", "w4a8"),
        ("adaquant", "w4a8"),
        ("qdrop", "w4a4"),
    ],
)
def test_reloaded_simulation_is_bit_identical(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    weights: Path,
    images: Path,
    method: str,
    bits: str,
):
    out = tmp_path / "m.qcli"
    cfg = CalibrateConfig(
        ModelOptions(R20, weights=str(weights)),
        DataOptions(images, batch_size=8),
        out,
        BitConfig.parse(bits),
        method,
        seed=0,
        settings={} if method == "minmax" else {"iters": 4},
        bn_tune=True,
    )
    memory, result = _calibrate_in_memory(monkeypatch, cfg)
    assert result["tuning"]["bn_tune_layers"] > 0  # BN tuning really rewrote layers
    if bits == "w8a8":  # layers given the full int8 grid back: their spec must be reloaded
        assert result["int8_range"]["widened"]
    reloaded = load_qmodel(out).graph

    saved = memory.module.state_dict()
    rebuilt = reloaded.module.state_dict()
    assert saved.keys() == rebuilt.keys()
    for key in saved:
        assert saved[key].dtype == rebuilt[key].dtype, key
        assert torch.equal(saved[key].cpu(), rebuilt[key]), key

    assert _forward_state(memory) == _forward_state(reloaded)
    assert [n for n, _ in memory.layers()] == [n for n, _ in reloaded.layers()]
    for (name, a), (_, b) in zip(memory.quantizers(), reloaded.quantizers(), strict=True):
        assert torch.equal(a.scale.detach(), b.scale.detach()), name
        assert torch.equal(a.zero_point, b.zero_point), name
    for (name, a), (_, b) in zip(memory.layers(), reloaded.layers(), strict=True):
        assert torch.equal(a.weight.detach(), b.weight.detach()), name
        ia, ib = a.input_quantizer, b.input_quantizer
        assert (ia is None) == (ib is None), name
        if ia is not None:  # the int32 bias grid reads the linked input quantizer
            assert torch.equal(ia.scale.detach(), ib.scale.detach()), name
        qa, qb = a.quantized_bias(), b.quantized_bias()
        assert (qa is None) == (qb is None), name
        if qa is not None:
            assert torch.equal(qa.detach(), qb.detach()), name

    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_memory = memory.module.eval()(x)
        y_reloaded = reloaded.module.eval()(x)
    assert torch.equal(y_memory, y_reloaded)
    # the simulation is really quantized (not two identical float models)
    float_twin = load_qmodel(out).graph
    set_float(float_twin)
    with torch.no_grad():
        assert not torch.equal(float_twin.module.eval()(x), y_reloaded)
