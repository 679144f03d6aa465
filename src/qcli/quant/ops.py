"""The operator table: what each traced graph node is, in one vocabulary.

Quantizer placement (`capture`) and the ONNX writer (`export`) both read this table, so an op
the exporter cannot write is also one the capture refuses, with the layer's name.

Kinds:
- weighted: conv / linear, integer kernels with quantized weights;
- fusable: activations an integer kernel applies by clipping (ReLU, ReLU6): the quantizer
  goes after them instead of between;
- compute: ops whose output leaves the input grid and so needs its own quantizer;
- passthrough: ops that only move or select values (on-grid in, on-grid out);
- quant: an activation quantizer inserted by capture.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcli.quant.modules import QConv2d, QLinear
from qcli.quant.quantizer import Quantizer

WEIGHTED, FUSABLE, COMPUTE, PASSTHROUGH, QUANT = (
    "weighted",
    "fusable",
    "compute",
    "passthrough",
    "quant",
)

_KIND = {
    "conv": WEIGHTED,
    "linear": WEIGHTED,
    "relu": FUSABLE,
    "relu6": FUSABLE,
    "add": COMPUTE,
    "sub": COMPUTE,
    "mul": COMPUTE,
    "div": COMPUTE,
    "cat": COMPUTE,
    "sigmoid": COMPUTE,
    "hardsigmoid": COMPUTE,
    "hardswish": COMPUTE,
    "silu": COMPUTE,
    "gelu": COMPUTE,
    "tanh": COMPUTE,
    "hardtanh": COMPUTE,
    "mean": COMPUTE,
    "avgpool": COMPUTE,
    "adaptive_avgpool": COMPUTE,
    "batchnorm": COMPUTE,
    "identity": PASSTHROUGH,
    "flatten": PASSTHROUGH,
    "reshape": PASSTHROUGH,
    "getitem": PASSTHROUGH,
    "maxpool": PASSTHROUGH,
    "pad": PASSTHROUGH,
    "permute": PASSTHROUGH,
    "squeeze": PASSTHROUGH,
    "unsqueeze": PASSTHROUGH,
    "quant": QUANT,
}

# Order matters: subclasses before their bases.
_MODULES: list[tuple[type, str]] = [
    (Quantizer, "quant"),
    (QConv2d, "conv"),
    (QLinear, "linear"),
    (nn.Conv2d, "conv"),
    (nn.Linear, "linear"),
    (nn.BatchNorm2d, "batchnorm"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Hardswish, "hardswish"),
    (nn.SiLU, "silu"),
    (nn.GELU, "gelu"),
    (nn.Tanh, "tanh"),
    (nn.Identity, "identity"),
    (nn.Dropout, "identity"),
    (nn.Flatten, "flatten"),
    (nn.MaxPool2d, "maxpool"),
    (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool2d, "adaptive_avgpool"),
    (nn.ZeroPad2d, "pad"),
]

_FUNCTIONS = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    torch.cat: "cat",
    torch.concat: "cat",
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.hardsigmoid: "hardsigmoid",
    F.hardswish: "hardswish",
    F.silu: "silu",
    F.gelu: "gelu",
    torch.tanh: "tanh",
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    F.adaptive_avg_pool2d: "adaptive_avgpool",
    F.avg_pool2d: "avgpool",
    F.max_pool2d: "maxpool",
    F.pad: "pad",
    F.dropout: "identity",
    operator.getitem: "getitem",
    torch.mean: "mean",
    torch.permute: "permute",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
}

_METHODS = {
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "mean": "mean",
    "flatten": "flatten",
    "view": "reshape",
    "reshape": "reshape",
    "contiguous": "identity",
    "clone": "identity",
    "permute": "permute",
    "squeeze": "squeeze",
    "unsqueeze": "unsqueeze",
}


@dataclass(frozen=True)
class Op:
    name: str
    kind: str


def module_op(m: nn.Module) -> str | None:
    for cls, name in _MODULES:
        if isinstance(m, cls):
            return name
    return None


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> Op | None:
    """The canonical op of a tensor-producing node, or None when qcli does not support it."""
    name: str | None = None
    if node.op == "call_module":
        name = module_op(modules[node.target])
    elif node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        name = _METHODS.get(node.target)
    if name is None:
        return None
    return Op(name, _KIND[name])


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A human name for a node, for error messages: the layer path and its type."""
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"operation '{node.name}' ({target})"
