"""Write an op qcli's table does not know: torch's own ONNX exporter, one node at a time.

A float op (a custom module fx could not trace, `torch.roll`, `chunk`, a norm layer from a
library) runs in the simulation exactly as the model wrote it. To put the same computation in
the file, the node is wrapped in a module that replays it on its tensor inputs, exported with
`torch.onnx.export` at the model's opset, and the resulting nodes are spliced into the QDQ
graph under fresh names. Its inputs are DequantizeLinear outputs and its output gets the
activation quantizer capture placed after it: float between DQ and Q, as onnxruntime's own
quantizer leaves ops it has no integer kernel for.
"""

from __future__ import annotations

import io
import itertools
import warnings
from dataclasses import dataclass

import onnx
import torch
from torch import fx, nn

from qcli.errors import QcliError, first_line


@dataclass(frozen=True)
class _Slot:
    index: int  # position among the node's tensor inputs


class _Replay(nn.Module):
    """Calls one fx node's target with its tensor arguments given positionally."""

    def __init__(self, node: fx.Node, module: nn.Module | None, args, kwargs) -> None:
        super().__init__()
        self.kind, self.target = node.op, node.target
        self.inner = module
        self.args_, self.kwargs_ = args, kwargs

    def forward(self, *tensors):
        def fill(v):
            return tensors[v.index] if isinstance(v, _Slot) else v

        args = fx.node.map_aggregate(self.args_, fill)
        kwargs = fx.node.map_aggregate(self.kwargs_, fill)
        if self.kind == "call_module":
            return self.inner(*args, **kwargs)
        if self.kind == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


def write(w, n: fx.Node, m: nn.Module | None, x, env: dict, hint: str) -> str | list[str]:
    """Splice the ONNX export of node `n` into writer `w`; returns its output name(s)."""
    inputs: list[fx.Node] = []

    def slot(a):
        if not isinstance(a, fx.Node):
            return a
        if isinstance(env.get(a), str):
            inputs.append(a)
            return _Slot(len(inputs) - 1)
        if a.meta.get("value") != a.meta.get("value2"):
            raise QcliError(
                f"cannot export '{hint}': its argument '{a.name}' depends on the batch size"
            )
        return a.meta.get("value")

    args = fx.node.map_aggregate(n.args, slot)
    kwargs = fx.node.map_aggregate(n.kwargs, slot)
    replay = _Replay(n, m, args, kwargs).eval()
    examples = tuple(_example(a) for a in inputs)
    names_in = [f"in{i}" for i in range(len(inputs))]
    structure = _structure(n.meta["tensor_meta"], itertools.count())
    names_out = [f"out{i}" for i in _leaves(structure)]
    sub = _export(replay, examples, names_in, names_out, w.opset, hint)
    rename = {name: env[a] for name, a in zip(names_in, inputs, strict=True)}
    for t in sub.graph.initializer:
        rename[t.name] = w.fresh(f"{hint}_{t.name}")
        t.name = rename[t.name]
        w.inits.append(t)
    for node in sub.graph.node:
        for i, name in enumerate(node.input):
            if name:
                node.input[i] = rename.get(name, name)
        for i, name in enumerate(node.output):
            rename[name] = w.fresh(f"{hint}_{name}")
            node.output[i] = rename[name]
        node.name = w.fresh(f"{hint}_{node.op_type}")
        w.nodes.append(node)
    return _fill(structure, lambda i: rename[f"out{i}"])


def _structure(meta, counter):
    """The node's output as nested lists of output positions (an LSTM gives (y, (h, c)))."""
    if hasattr(meta, "shape"):
        return next(counter)
    return [_structure(m, counter) for m in meta]


def _leaves(structure) -> list[int]:
    if isinstance(structure, int):
        return [structure]
    return [i for s in structure for i in _leaves(s)]


def _fill(structure, name):
    if isinstance(structure, int):
        return name(structure)
    return [_fill(s, name) for s in structure]


def _example(a: fx.Node) -> torch.Tensor:
    meta = a.meta["tensor_meta"]
    if meta.dtype.is_floating_point:
        return torch.randn(tuple(meta.shape), generator=torch.Generator().manual_seed(0))
    return torch.zeros(tuple(meta.shape), dtype=meta.dtype)


def _export(replay, examples, names_in, names_out, opset: int, hint: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                replay,
                examples,
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes={k: {0: "batch"} for k in names_in + names_out},
                do_constant_folding=True,
            )
    except Exception as e:
        raise QcliError(f"cannot export '{hint}' to ONNX ({first_line(e)})") from e
    model = onnx.load_from_string(buf.getvalue())
    domains = {node.domain for node in model.graph.node} - {"", "ai.onnx"}
    if domains:
        raise QcliError(f"cannot export '{hint}': torch writes it with custom ops ({domains})")
    return model
