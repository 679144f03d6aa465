"""Range-setting PTQ: choose every quantizer's scale and zero point from observed ranges.

Weights are estimated directly, per channel; activations by running the calibration batches
through the graph once with every activation quantizer observing instead of quantizing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from qcli.methods.registry import register_calibration
from qcli.quant.capture import QuantGraph
from qcli.quant.quantizer import observing
from qcli.quant.ranges import make_estimator, weight_qparams


def set_weight_ranges(qg: QuantGraph, method: str) -> None:
    wm = "mse" if method == "mse" else "minmax"
    for _, layer in qg.layers():
        wq = layer.weight_quantizer
        if wq is not None:
            wq.set_qparams(*weight_qparams(layer.weight, wq.spec, wm))


@torch.no_grad()
def set_activation_ranges(
    qg: QuantGraph,
    batches: Iterable[Tensor],
    method: str,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Observe every activation quantizer on the batches; returns the number of images seen."""
    device = next(qg.module.parameters()).device
    seen = 0
    with observing(qg.select(weights=False), lambda: make_estimator(method)) as quantizers:
        for x in batches:
            qg.module(x.to(device))
            seen += x.shape[0]
            if progress:
                progress(x.shape[0])
        if seen == 0:
            raise ValueError("no calibration images")
        for q in quantizers:
            q.set_qparams(*q.observer.qparams(q.spec))
    return seen


def fit_bias_grids(qg: QuantGraph) -> int:
    """Every method ends with this: int32 biases are what integer deployment kernels take."""
    return sum(layer.fit_bias_grid() for _, layer in qg.layers())


def _range_method(name: str):
    def run(qg: QuantGraph, batches: Iterable[Tensor], settings=None, progress=None) -> dict:
        set_weight_ranges(qg, name)
        n = set_activation_ranges(qg, batches, name, progress)
        widened = fit_bias_grids(qg)
        return {"images": n, "range_method": name, "bias_grid_channels_widened": widened}

    return run


for _name, _summary in (
    ("minmax", "full observed range (never clips)"),
    ("percentile", "clip the 0.01% tails of each activation"),
    ("mse", "clipping that minimizes the squared quantization error"),
):
    register_calibration(_name, _summary)(_range_method(_name))
