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

Every compute op either has an integer kernel in onnxruntime (`Op.integer`) or runs in float
between DequantizeLinear and QuantizeLinear, as onnxruntime's own quantizer leaves unknown ops.
An op this table does not know is such a float op too (`FALLBACK`): the simulation runs it as
traced and the exporter writes it through torch's ONNX exporter, so capture never refuses a
working model for an op it does not know.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcli.quant.modules import PaddedConv2d, QConv2d, QLinear
from qcli.quant.quantizer import Quantizer

WEIGHTED, FUSABLE, COMPUTE, PASSTHROUGH, QUANT = (
    "weighted",
    "fusable",
    "compute",
    "passthrough",
    "quant",
)
FALLBACK = "float"  # an op outside this table: float in the simulation and the file alike

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
    "matmul": COMPUTE,
    "layer_norm": COMPUTE,
    "softmax": COMPUTE,
    "attention_softmax": COMPUTE,
    "transpose": PASSTHROUGH,
    "expand": PASSTHROUGH,
    "roll": PASSTHROUGH,
    "chunk": PASSTHROUGH,
    "split": PASSTHROUGH,
    "unbind": PASSTHROUGH,
    FALLBACK: COMPUTE,
}

# Compute ops onnxruntime runs in integer kernels when their inputs and output are QDQ
# (QLinearConv/MatMul, QLinearAdd/Mul/Concat/AveragePool/Sigmoid, fused ReLU clips); every
# other compute op runs in float between DequantizeLinear and QuantizeLinear.
INTEGER_OPS = frozenset(
    {
        "conv",
        "linear",
        "matmul",
        "add",
        "mul",
        "cat",
        "sigmoid",
        "mean",
        "avgpool",
        "adaptive_avgpool",
        "relu",
        "relu6",
    }
)


def attention_softmax(scores: torch.Tensor, scale: float, mask: torch.Tensor | None = None):
    """softmax(scores · scale + mask) over the last axis: attention's float part.

    Capture splits `scaled_dot_product_attention` into q·kᵀ (an integer MatMul), this, and
    attention·v (another), so the scale is applied in float after the integer product
    instead of requantizing q first.
    """
    scores = scores * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1)


# Order matters: subclasses before their bases.
_MODULES: list[tuple[type, str]] = [
    (Quantizer, "quant"),
    (QConv2d, "conv"),
    (QLinear, "linear"),
    (PaddedConv2d, "conv"),
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
    (nn.LayerNorm, "layer_norm"),
    (nn.Softmax, "softmax"),
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
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    F.layer_norm: "layer_norm",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    torch.transpose: "transpose",
    torch.roll: "roll",
    torch.chunk: "chunk",
    torch.split: "split",
    torch.unbind: "unbind",
    attention_softmax: "attention_softmax",
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
    "matmul": "matmul",
    "bmm": "matmul",
    "softmax": "softmax",
    "transpose": "transpose",
    "expand": "expand",
    "roll": "roll",
    "chunk": "chunk",
    "split": "split",
    "unbind": "unbind",
}


@dataclass(frozen=True)
class Op:
    name: str
    kind: str

    @property
    def integer(self) -> bool:
        """Whether onnxruntime runs this op in an integer kernel (passthrough ops move
        integers; a float op runs between DequantizeLinear and QuantizeLinear)."""
        return self.kind in (PASSTHROUGH, QUANT) or self.name in INTEGER_OPS


def module_op(m: nn.Module) -> str | None:
    """The op of a module, matched by class; a subclass that brings its own forward (timm's
    channels-first LayerNorm2d) is not its base class's op and is traced through instead,
    unless it is a conv/linear that computes what its base does (timm's Linear, which only
    casts), checked once on a random input."""
    for cls, name in _MODULES:
        if isinstance(m, cls) and (
            type(m).forward is cls.forward or (cls in _WEIGHTED_BASES and _same_as_base(m, cls))
        ):
            return name
    return None


_WEIGHTED_BASES = (nn.Conv2d, nn.Linear)
_SAME: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _same_as_base(m: nn.Module, cls: type) -> bool:
    if m not in _SAME:
        g = torch.Generator().manual_seed(0)
        if isinstance(m, nn.Conv2d):
            side = max(m.kernel_size) * max(m.dilation) + 4
            x = torch.randn(1, m.in_channels, side, side, generator=g)
        else:
            x = torch.randn(2, m.in_features, generator=g)
        x = x.to(m.weight.device, m.weight.dtype)
        try:
            _SAME[m] = torch.equal(m.forward(x), cls.forward(m, x))
        except Exception:
            _SAME[m] = False
    return _SAME[m]


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> Op | None:
    """The canonical op of a call node; `FALLBACK` for one outside the table (None for the
    graph's placeholders, outputs and attributes)."""
    name: str | None = None
    if node.op == "call_module":
        name = module_op(modules[node.target])
    elif node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        name = _METHODS.get(node.target)
    else:
        return None
    if name is None:
        name = FALLBACK
    elif name == "getitem" and _picks_from_float_op(node, modules):
        name = FALLBACK  # one output of a float op returning several: quantized like it
    return Op(name, _KIND[name])


def _picks_from_float_op(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    src = node.args[0]
    if not isinstance(src, fx.Node) or "tensor_meta" not in src.meta:
        return False
    if hasattr(src.meta["tensor_meta"], "shape"):
        return False  # indexing a tensor: data movement
    op = classify(src, modules)
    return op is not None and op.kind != PASSTHROUGH


def op_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A short name of what a node computes, for reports ("layer_norm", "float:roll")."""
    op = classify(node, modules)
    if op is None or op.name != FALLBACK:
        return op.name if op else node.op
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A human name for a node, for error messages: the layer path and its type."""
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"operation '{node.name}' ({target})"
