"""The float model as an ONNX file: the FP32 baseline a quantized file is compared with.

Written from the captured graph with every quantizer off, so it is exactly the float function
qcli quantized, with the static pads and shapes capture fixed for the model's input size
(timm's 'same' convolutions included), run by the same onnxruntime as the INT8 file.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from qcli.quant.capture import QuantGraph, set_float


def write_float_onnx(qg: QuantGraph, path: Path) -> Path:
    """Export `qg` with its quantizers off (opset 17, dynamic batch) to `path`."""
    graph = copy.deepcopy(qg)
    set_float(graph)
    return export_module(graph.module, graph.input_shape, path)


def export_module(module: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """A float module as ONNX (opset 17, input `input` with a dynamic batch, output `logits`):
    the FP32 file that latency and size are compared against."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.zeros(1, *input_shape),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    return path
