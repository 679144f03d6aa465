"""Write a QuantGraph as a standard ONNX QDQ model.

The writer walks the same fx graph that the simulation runs, through the same op table
(`quant.ops`), so every quantizer of the simulation becomes exactly one QuantizeLinear /
DequantizeLinear pair here and nothing else is quantized.

Storage:
- weights are stored as integers: int8 by default at every width, which onnxruntime runs in
  its fused integer kernels, or int4 (opset 21) at 2-4 bits with `weight_storage="int4"`,
  half the size but dequantized to float on every call (onnxruntime has no int4 conv
  kernel). Below the storage width the values simply stay inside the narrower range
  [qmin, qmax], so the same integers and scales give the same function in either storage;
- a layer whose int8 weights could saturate the int16 pair sums of onnxruntime's u8×s8
  kernels on x86 without VNNI is stored as uint8 with zero point 128 instead (u8×u8 kernels
  never saturate), unless the model was calibrated with `int8_range="full"` for CPUs known
  to accumulate in int32; `quant.grid.stores_unsigned` decides, as that module decides
  every grid;
- activations use uint8 (int8 when signed) at every width. Below 8 bits a Clip to
  [(qmin - zp)·s, (qmax - zp)·s] precedes QuantizeLinear, which makes its saturation equal
  the narrower clamp of the simulation. uint4 activations are avoided on purpose: onnxruntime
  has no integer kernels for them, and its Clip->QuantizeLinear fusion rejects a uint4 zero
  point (onnxruntime 1.32 fails to load such a model);
- conv/linear biases are int32 on the grid input_scale × weight_scale, as onnxruntime's
  integer kernels (QLinearConv) consume them; the simulation rounds them the same way.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import fx, nn

from qcli import __version__
from qcli.errors import QcliError
from qcli.export import fallback, kernels
from qcli.quant import exact, ops
from qcli.quant.capture import QuantGraph, hardtanh_bounds
from qcli.quant.grid import U8_ZP, pairs_products, stores_unsigned
from qcli.quant.modules import QConv2d, QLinear
from qcli.quant.primitives import bias_scale
from qcli.quant.quantizer import Quantizer

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
WEIGHT_STORAGES = ("int8", "int4")


def _storage(bits: int, signed: bool, packed: bool = False) -> tuple[int, int, int]:
    """ONNX dtype and its integer range: 4-bit types when `packed` and bits <= 4, else 8."""
    if bits > 4 or not packed:
        return (TensorProto.INT8, -128, 127) if signed else (TensorProto.UINT8, 0, 255)
    return (TensorProto.INT4, -8, 7) if signed else (TensorProto.UINT4, 0, 15)


def needs_opset21(qg: QuantGraph, weight_storage: str = "int8") -> bool:
    """int4 weight storage exists from opset 21 on."""
    return weight_storage == "int4" and any(
        layer.weight_quantizer is not None and layer.weight_quantizer.spec.bits <= 4
        for _, layer in qg.layers()
    )


@dataclass
class _QInfo:
    """The grid a value is on, so passthrough ops can restate it after moving values."""

    scale: str
    zero_point: str
    clip: tuple[float, float] | None


@dataclass
class _Writer:
    opset: int
    weight_storage: str = "int8"
    int8_range: str = "safe"
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    names: set = field(default_factory=set)
    qinfo: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)
    codes: dict = field(default_factory=dict)  # DequantizeLinear output -> its integer input
    quantizer_codes: dict = field(default_factory=dict)  # activation quantizer -> its codes

    def fresh(self, hint: str) -> str:
        base = hint.replace(".", "_")
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, hint: str, value, dtype: int = TensorProto.FLOAT) -> str:
        arr = np.asarray(value)
        name = self.fresh(hint)
        if dtype in (TensorProto.INT4, TensorProto.UINT4):
            vals = arr.astype(np.int64).reshape(-1).tolist()
            self.inits.append(helper.make_tensor(name, dtype, arr.shape, vals))
        else:
            np_type = helper.tensor_dtype_to_np_dtype(dtype)
            self.inits.append(onnx.numpy_helper.from_array(arr.astype(np_type), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    # -- quantization -------------------------------------------------------------------

    def qdq(self, x: str, q: Quantizer, hint: str, full: bool = False) -> str:
        """Q/DQ onto q's grid. Below the storage width a Clip narrows it, behind a full-width
        Q/DQ on the same scale: onnxruntime fuses an integer op only with a QuantizeLinear
        that follows it directly, and the Clip on dequantized grid values is exact. `full`
        writes the full-width pair alone."""
        spec = q.spec
        dtype, lo, hi = _storage(spec.bits, spec.signed)
        scale = q.scale.detach().float().cpu().numpy()
        zp = q.zero_point.detach().cpu().numpy().round().astype(np.int64)
        s_name = self.const(f"{hint}_scale", scale)
        z_name = self.const(f"{hint}_zero_point", zp, dtype)
        if full or (spec.qmin, spec.qmax) == (lo, hi):
            return self._qdq_with(x, _QInfo(s_name, z_name, None), hint)
        clip = (
            float(np.float32((spec.qmin - zp) * scale)),
            float(np.float32((spec.qmax - zp) * scale)),
        )
        if x not in self.qinfo:
            x = self._qdq_with(x, _QInfo(s_name, z_name, None), f"{hint}_full")
        return self._qdq_with(x, _QInfo(s_name, z_name, clip), hint)

    def _qdq_with(self, x: str, info: _QInfo, hint: str) -> str:
        if info.clip is not None:
            lo = self.const(f"{hint}_clip_lo", np.float32(info.clip[0]))
            hi = self.const(f"{hint}_clip_hi", np.float32(info.clip[1]))
            x = self.op("Clip", [x, lo, hi], f"{hint}_clip")
        xq = self.op("QuantizeLinear", [x, info.scale, info.zero_point], f"{hint}_q")
        out = self.op("DequantizeLinear", [xq, info.scale, info.zero_point], f"{hint}_dq")
        self.qinfo[out] = info
        self.codes[out] = xq
        return out

    def restate_grid(self, src: str, out: str, hint: str) -> str:
        """After a passthrough op, repeat its input's Q/DQ so onnxruntime keeps integer paths."""
        info = self.qinfo.get(src)
        return out if info is None else self._qdq_with(out, info, hint)

    def weight(self, layer: QConv2d | QLinear, hint: str) -> str:
        wq = layer.weight_quantizer
        w = layer.weight.detach().float().cpu()
        if wq is None or not wq.active:
            return self.const(f"{hint}_weight", w.numpy())
        dtype, _, _ = _storage(wq.spec.bits, wq.spec.signed, self.weight_storage == "int4")
        ints = wq.quantize_int(w).numpy()
        zp = wq.zero_point.detach().cpu().numpy().round()
        iq = layer.input_quantizer
        if dtype == TensorProto.INT8 and stores_unsigned(
            self.int8_range, iq.spec if iq is not None else None, pairs_products(layer), ints
        ):
            dtype, ints, zp = TensorProto.UINT8, ints + U8_ZP, zp + U8_ZP
        q = self.const(f"{hint}_weight_int", ints, dtype)
        s = self.const(f"{hint}_weight_scale", wq.scale.detach().float().cpu().numpy())
        z = self.const(f"{hint}_weight_zero_point", zp, dtype)
        return self.op("DequantizeLinear", [q, s, z], f"{hint}_weight_dq", axis=0)

    def bias(self, layer: QConv2d | QLinear, hint: str) -> str | None:
        if layer.bias is None:
            return None
        ints = layer.integer_bias()
        if ints is None:  # float bias: weight or input not quantized, or beyond int32
            return self.const(f"{hint}_bias", layer.bias.detach().float().cpu().numpy())
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        s = bias_scale(iq.scale.detach().float().cpu(), wq.scale.detach().float().cpu())
        q = self.const(f"{hint}_bias_int", ints.cpu().numpy(), TensorProto.INT32)
        s_name = self.const(f"{hint}_bias_scale", s.numpy())
        z = self.const(f"{hint}_bias_zero_point", np.zeros(ints.shape), TensorProto.INT32)
        return self.op("DequantizeLinear", [q, s_name, z], f"{hint}_bias_dq", axis=0)


def to_onnx(qg: QuantGraph, weight_storage: str = "int8") -> onnx.ModelProto:
    """The QDQ ONNX model of `qg`, in memory; `weight_storage` is one of WEIGHT_STORAGES."""
    if weight_storage not in WEIGHT_STORAGES:
        raise ValueError(f"weight_storage must be one of {WEIGHT_STORAGES}")
    opset = 21 if needs_opset21(qg, weight_storage) else 17
    gm = qg.module
    mods = dict(gm.named_modules())
    w = _Writer(opset, weight_storage, qg.int8_range, modules=mods)
    env: dict[fx.Node, str] = {}
    outputs: list[str] = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = INPUT_NAME
            w.names.add(INPUT_NAME)
        elif n.op == "output":
            outputs.append(_arg(env, n.args[0]))
        elif "tensor_meta" not in n.meta:
            continue  # shape arithmetic and assertions: constants of the traced shapes
        elif n.op == "get_attr":
            env[n] = w.const(
                f"{n.name}_const", operator.attrgetter(n.target)(gm).detach().float().cpu().numpy()
            )
        else:
            env[n] = _emit(w, n, mods, env)
    if len(outputs) != 1:
        raise QcliError("qcli exports models with exactly one output tensor")
    final = w.op("Identity", [outputs[0]], OUTPUT_NAME)
    c, h, wd = qg.input_shape
    graph = helper.make_graph(
        w.nodes,
        "qcli",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", c, h, wd])],
        [helper.make_tensor_value_info(final, TensorProto.FLOAT, ["N", None])],
        w.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qcli"
    )
    model.producer_version = __version__
    bits = {name: q.spec.bits for name, q in qg.quantizers()}
    exact_on = kernels.ALL_CLASSES
    if kernels.pair_sum_violations(model):
        exact_on = kernels.INT32_ACCUMULATING
    helper.set_model_props(
        model,
        {
            "qcli_version": __version__,
            "qcli_bits": qg.base_plan.describe(),
            "qcli_quantizers": json.dumps(bits),
            "qcli_weight_storage": weight_storage,
            "qcli_int8_range": qg.int8_range,
            "qcli_exact_on": ",".join(exact_on),
            "qcli_quantizer_codes": json.dumps(w.quantizer_codes),
            "qcli_integer_arithmetic": f"onnxruntime {exact.ONNXRUNTIME_VERSION}",
        },
    )
    return model


def _arg(env: dict, a) -> str:
    if not isinstance(a, fx.Node) or not isinstance(env.get(a), str):
        raise QcliError(f"qcli exports models with exactly one output tensor, not {a!r}")
    return env[a]


def _shape(n: fx.Node) -> tuple[int, ...]:
    return tuple(n.meta["tensor_meta"].shape)


def _emit(w: _Writer, n: fx.Node, mods: dict[str, nn.Module], env: dict) -> str | list[str]:
    op = ops.classify(n, mods)
    hint = str(n.target) if n.op == "call_module" else n.name
    x = env.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
    m = mods.get(n.target) if n.op == "call_module" else None
    handler = _HANDLERS.get(op.name, fallback.write)
    if isinstance(x, list):  # one output of a node with several, written with it
        if n.op != "call_function" or n.target is not operator.getitem:
            raise QcliError(f"cannot export {ops.describe(n, mods)}: it takes a tuple")
        return x[n.args[1]]
    out = handler(w, n, m, x, env, hint)
    if op.kind == ops.PASSTHROUGH and isinstance(x, str):
        if isinstance(out, list):
            return [w.restate_grid(x, o, f"{hint}_{i}") for i, o in enumerate(out)]
        out = w.restate_grid(x, out, hint)
    return out


# -- op handlers: (writer, node, module or None, first input name, env, hint) -> output -----


def _quant(w, n, m, x, env, hint):
    out = w.qdq(x, m, hint)
    w.quantizer_codes[n.target] = w.codes[out]
    return out


def _fused(handler):
    """An activation an integer kernel applies by saturating (ReLU, ReLU6): onnxruntime drops
    it from between the op and its QuantizeLinear only where it cannot change a code. Where
    it could (a narrower grid, a zero point above 0), a full-width Q/DQ on the consumer's
    grid goes before it, so the op still runs in its integer kernel; the activation then
    runs on grid values, which is exact (`quant.exact` computes the same)."""

    def wrapped(w, n, m, x, env, hint):
        q = _consumer_quantizer(n, w.modules)
        if q is not None and x not in w.qinfo and not _saturation_clips(n, m, q):
            x = w.qdq(x, q, f"{hint}_in", full=True)
        return handler(w, n, m, x, env, hint)

    return wrapped


def _consumer_quantizer(n: fx.Node, mods: dict) -> Quantizer | None:
    users = list(n.users)
    if len(users) == 1 and users[0].op == "call_module":
        m = mods[users[0].target]
        return m if isinstance(m, Quantizer) and m.active else None
    return None


def _saturation_clips(n: fx.Node, m, q: Quantizer) -> bool:
    """Whether onnxruntime removes the activation between an integer op and q's full-width
    QuantizeLinear (and so fuses the op): ReLU when the zero point is the type's minimum,
    a Clip when the quantizer's whole range lies inside it within float32 epsilon
    (ReluQuantFusion / ClipQuantFusion of onnxruntime ONNXRUNTIME_VERSION). Saturation then
    clips exactly where the activation would."""
    lo_code, hi_code = _storage(q.spec.bits, q.spec.signed)[1:]
    if (q.spec.qmin, q.spec.qmax) != (lo_code, hi_code):
        return False
    zp = int(q.zero_point.round())
    lo, hi = exact.activation_bounds(n, m)
    if hi == float("inf"):
        return lo == 0.0 and zp == lo_code
    s = np.float32(q.scale.detach().float())
    lower, upper = s * np.float32(lo_code - zp), s * np.float32(hi_code - zp)
    eps = np.finfo(np.float32).eps
    return bool(np.float32(lo) - lower <= eps and upper - np.float32(hi) <= eps)


def _conv(w, n, m: QConv2d, x, env, hint):
    weight = w.weight(m, hint)
    bias = w.bias(m, hint)
    if m.pads is not None:
        left, right, top, bottom = m.pads
        pads = [top, left, bottom, right]
    else:
        ph, pw = m.padding
        pads = [ph, pw, ph, pw]
    inputs = [x, weight] + ([bias] if bias else [])
    return w.op(
        "Conv",
        inputs,
        hint,
        kernel_shape=list(m.kernel_size),
        strides=list(m.stride),
        pads=pads,
        dilations=list(m.dilation),
        group=m.groups,
    )


def _linear(w, n, m: QLinear, x, env, hint):
    """A Gemm (QGemm in onnxruntime, the int32 bias inside the accumulator). Inputs of more
    than two dims (tokens) are flattened to rows around it; the grid is restated after each
    reshape and the consumer's QuantizeLinear written right after the Gemm, so onnxruntime
    still fuses it (MatMul + Add would add the bias in float)."""
    weight = w.weight(m, hint)
    bias = w.bias(m, hint)
    if len(_shape(n.args[0])) == 2:
        return w.op("Gemm", [x, weight] + ([bias] if bias else []), hint, transB=1)
    rows = w.const(f"{hint}_rows", np.array([-1, m.in_features], dtype=np.int64), TensorProto.INT64)
    flat = w.restate_grid(x, w.op("Reshape", [x, rows], f"{hint}_flat"), f"{hint}_flat")
    y = w.op("Gemm", [flat, weight] + ([bias] if bias else []), hint, transB=1)
    q = _consumer_quantizer(n, w.modules)
    if q is not None:
        y = w.qdq(y, q, f"{hint}_out", full=True)
    out = w.op("Reshape", [y, _runtime_shape(w, n, hint)], f"{hint}_tokens")
    return w.restate_grid(y, out, f"{hint}_tokens")


def _binary(onnx_op: str):
    def handler(w, n, m, x, env, hint):
        a, b = n.args[0], n.args[1]
        names = []
        for v in (a, b):
            if isinstance(v, fx.Node):
                names.append(env[v])
            else:
                names.append(w.const(f"{hint}_const", np.float32(v)))
        return w.op(onnx_op, names, hint)

    return handler


def _unary(onnx_op: str, **attrs):
    def handler(w, n, m, x, env, hint):
        return w.op(onnx_op, [x], hint, **attrs)

    return handler


def _clip(w, n, m, x, env, hint):
    if (n.op == "call_module" and isinstance(m, nn.ReLU6)) or _is_relu6_fn(n):
        lo, hi = 0.0, 6.0
    else:
        lo, hi = hardtanh_bounds(n, {n.target: m} if m is not None else {})
    return w.op(
        "Clip",
        [x, w.const(f"{hint}_min", np.float32(lo)), w.const(f"{hint}_max", np.float32(hi))],
        hint,
    )


def _is_relu6_fn(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is torch.nn.functional.relu6


def _silu(w, n, m, x, env, hint):
    return w.op("Mul", [x, w.op("Sigmoid", [x], f"{hint}_sigmoid")], hint)


def _gelu(w, n, m, x, env, hint):
    approx = (m.approximate if m is not None else n.kwargs.get("approximate", "none")) or "none"
    if w.opset >= 20:
        return w.op("Gelu", [x], hint, approximate=approx)
    if approx != "none":
        raise QcliError(f"cannot export '{hint}': tanh-approximated GELU needs opset 20")
    c = w.const(f"{hint}_rsqrt2", np.float32(1 / np.sqrt(2)))
    erf = w.op("Erf", [w.op("Mul", [x, c], f"{hint}_scaled")], f"{hint}_erf")
    one = w.const(f"{hint}_one", np.float32(1.0))
    half = w.const(f"{hint}_half", np.float32(0.5))
    return w.op(
        "Mul",
        [w.op("Mul", [x, half], f"{hint}_halfx"), w.op("Add", [erf, one], f"{hint}_1perf")],
        hint,
    )


def _cat(w, n, m, x, env, hint):
    tensors = n.args[0]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return w.op("Concat", [env[t] for t in tensors], hint, axis=int(dim))


def _mean(w, n, m, x, env, hint):
    rank = len(_shape(n.args[0]))
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    dims = [d % rank for d in ((dims,) if isinstance(dims, int) else dims)]
    if sorted(dims) == [2, 3] and rank == 4 and keep:
        return w.op("GlobalAveragePool", [x], hint)
    if w.opset >= 18:
        axes = w.const(f"{hint}_axes", np.array(dims, dtype=np.int64), TensorProto.INT64)
        return w.op("ReduceMean", [x, axes], hint, keepdims=int(bool(keep)))
    return w.op("ReduceMean", [x], hint, axes=dims, keepdims=int(bool(keep)))


def _adaptive_avgpool(w, n, m, x, env, hint):
    size = m.output_size if m is not None else n.args[1]
    size = (size, size) if isinstance(size, int) or size is None else tuple(size)
    in_hw = _shape(n.args[0])[2:]
    if size == (1, 1):
        return w.op("GlobalAveragePool", [x], hint)
    if tuple(s or i for s, i in zip(size, in_hw, strict=True)) == tuple(in_hw):
        return w.op("Identity", [x], hint)
    raise QcliError(f"cannot export '{hint}': adaptive average pooling to {size} is not supported")


def _pool_attrs(m, n) -> tuple[dict, list[int], bool]:
    if m is not None:
        k, s, p = m.kernel_size, m.stride, m.padding
        ceil = m.ceil_mode
        extra = {"dilation": getattr(m, "dilation", 1)}
        cip = getattr(m, "count_include_pad", True)
    else:
        args = list(n.args[1:]) + [None] * 5
        k = args[0] if args[0] is not None else n.kwargs["kernel_size"]
        s = args[1] if args[1] is not None else n.kwargs.get("stride") or k
        p = args[2] if args[2] is not None else n.kwargs.get("padding", 0)
        ceil = n.kwargs.get("ceil_mode", False)
        extra = {"dilation": n.kwargs.get("dilation", 1)}
        cip = n.kwargs.get("count_include_pad", True)

    def pair(v):
        return [v, v] if isinstance(v, int) else list(v)

    attrs = {
        "kernel_shape": pair(k),
        "strides": pair(s),
        "pads": pair(p) * 2,
        "ceil_mode": int(ceil),
    }
    return attrs, pair(extra["dilation"]), cip


def _maxpool(w, n, m, x, env, hint):
    attrs, dil, _ = _pool_attrs(m, n)
    return w.op("MaxPool", [x], hint, dilations=dil, **attrs)


def _avgpool(w, n, m, x, env, hint):
    attrs, _, cip = _pool_attrs(m, n)
    return w.op("AveragePool", [x], hint, count_include_pad=int(cip), **attrs)


def _batchnorm(w, n, m: nn.BatchNorm2d, x, env, hint):
    c = m.num_features
    scale = m.weight.detach().numpy() if m.affine else np.ones(c)
    bias = m.bias.detach().numpy() if m.affine else np.zeros(c)
    ins = [
        x,
        w.const(f"{hint}_scale", scale),
        w.const(f"{hint}_bias", bias),
        w.const(f"{hint}_mean", m.running_mean.numpy()),
        w.const(f"{hint}_var", m.running_var.numpy()),
    ]
    return w.op("BatchNormalization", ins, hint, epsilon=float(m.eps))


def _identity(w, n, m, x, env, hint):
    return w.op("Identity", [x], hint)


def _flatten(w, n, m, x, env, hint):
    start = (
        m.start_dim
        if m is not None
        else (n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0))
    )
    end = (
        m.end_dim
        if m is not None
        else (n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1))
    )
    rank = len(_shape(n.args[0]))
    if end % rank == rank - 1 and start % rank == 1:  # ONNX Flatten always gives 2-D
        return w.op("Flatten", [x], hint, axis=1)
    return _reshape(w, n, m, x, env, hint)


def _runtime_shape(w: _Writer, n: fx.Node, hint: str) -> str:
    """n's output shape as an int64 tensor; axes that grow with the batch (seen by capture at
    batch 1 and 2) are computed from the input's batch size at run time."""
    one, two = _shape(n), n.meta["shape2"]
    fixed = np.array(one, dtype=np.int64)
    dynamic = [i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b]
    if not dynamic:
        return w.const(f"{hint}_shape", fixed, TensorProto.INT64)
    if any(two[i] != 2 * one[i] for i in dynamic):
        raise QcliError(f"cannot export '{hint}': its shape does not grow with the batch")
    batch = w.op("Shape", [INPUT_NAME], f"{hint}_batch", start=0, end=1)
    parts, start = [], 0
    for i in dynamic:
        if i > start:
            parts.append(w.const(f"{hint}_dims", fixed[start:i], TensorProto.INT64))
        per = w.const(f"{hint}_per_image", fixed[i : i + 1], TensorProto.INT64)
        parts.append(w.op("Mul", [batch, per], f"{hint}_dim{i}"))
        start = i + 1
    if start < len(one):
        parts.append(w.const(f"{hint}_dims", fixed[start:], TensorProto.INT64))
    return w.op("Concat", parts, f"{hint}_shape", axis=0)


def _reshape(w, n, m, x, env, hint):
    return w.op("Reshape", [x, _runtime_shape(w, n, hint)], hint)


def _expand(w, n, m, x, env, hint):
    return w.op("Expand", [x, _runtime_shape(w, n, hint)], hint)


def _transpose(w, n, m, x, env, hint):
    rank = len(_shape(n.args[0]))
    a, b = (int(d) % rank for d in (n.args[1:3] if len(n.args) > 2 else n.kwargs.values()))
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return w.op("Transpose", [x], hint, perm=perm)


def _getitem(w, n, m, x, env, hint):
    """Basic indexing: slices, integers (a slice then a squeeze), None and one Ellipsis."""
    idx = n.args[1]
    idx = list(idx) if isinstance(idx, tuple) else [idx]
    rank = len(_shape(n.args[0]))
    if any(not isinstance(i, slice | int | type(None) | type(Ellipsis)) for i in idx):
        raise QcliError(f"cannot export '{hint}': only basic indexing of tensors is supported")
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        fill = rank - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx[at : at + 1] = [slice(None)] * fill
    starts, ends, axes, steps = [], [], [], []
    axis = 0
    for i in idx:
        if i is None:
            continue  # a new unit axis: the reshape below adds it
        sl = slice(i, i + 1 or None) if isinstance(i, int) else i
        if sl != slice(None):
            starts.append(sl.start or 0)
            ends.append(sl.stop if sl.stop is not None else np.iinfo(np.int64).max)
            axes.append(axis)
            steps.append(sl.step or 1)
        axis += 1
    out = x
    if axes:
        consts = [
            w.const(f"{hint}_{k}", np.array(v, dtype=np.int64), TensorProto.INT64)
            for k, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))
        ]
        out = w.op("Slice", [out, *consts], f"{hint}_slice")
    if any(i is None or isinstance(i, int) for i in idx):  # unit axes out and in
        return w.op("Reshape", [out, _runtime_shape(w, n, hint)], hint)
    return w.op("Identity", [out], hint) if out is x else out


def _matmul(w, n, m, x, env, hint):
    return w.op("MatMul", [env[n.args[0]], env[n.args[1]]], hint)


def _softmax(w, n, m, x, env, hint):
    dim = m.dim if m is not None else (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"))
    if dim is None:
        raise QcliError(f"cannot export '{hint}': softmax without a dim")
    return w.op("Softmax", [x], hint, axis=int(dim))


def _attention_softmax(w, n, m, x, env, hint):
    scaled = w.op("Mul", [x, w.const(f"{hint}_scale", np.float32(n.args[1]))], f"{hint}_scaled")
    mask = n.args[2] if len(n.args) > 2 else n.kwargs.get("mask")
    if mask is not None:
        scaled = w.op("Add", [scaled, env[mask]], f"{hint}_masked")
    return w.op("Softmax", [scaled], hint, axis=-1)


def _layer_norm(w, n, m, x, env, hint):
    if m is not None:
        shape, eps = tuple(m.normalized_shape), m.eps
        weight = m.weight.detach().float().numpy() if m.weight is not None else None
        bias = m.bias.detach().float().numpy() if m.bias is not None else None
        scale = w.const(f"{hint}_scale", weight if weight is not None else np.ones(shape))
        names = [scale] + ([w.const(f"{hint}_bias", bias)] if bias is not None else [])
    else:
        args = [*n.args[1:], None, None, None]
        shape = tuple(args[0])
        weight = args[1] if args[1] is not None else n.kwargs.get("weight")
        bias = args[2] if args[2] is not None else n.kwargs.get("bias")
        eps = args[3] if args[3] is not None else n.kwargs.get("eps", 1e-5)
        names = [env[weight] if weight is not None else w.const(f"{hint}_scale", np.ones(shape))]
        if bias is not None:
            names.append(env[bias])
    return w.op("LayerNormalization", [x, *names], hint, axis=-len(shape), epsilon=float(eps))


def _pad(w, n, m, x, env, hint):
    if m is not None:
        pad, value, mode = list(m.padding), float(getattr(m, "value", 0.0)), "constant"
    else:
        pad = list(n.args[1])
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", 0.0)
        value = 0.0 if value is None else float(value)
    if mode != "constant" or value != 0.0:
        raise QcliError(f"cannot export '{hint}': only zero padding is supported")
    rank = len(_shape(n.args[0]))
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    p = w.const(f"{hint}_pads", np.array(begins + ends, dtype=np.int64), TensorProto.INT64)
    return w.op("Pad", [x, p], hint, mode="constant")


def _permute(w, n, m, x, env, hint):
    dims = n.args[1:] if n.op == "call_method" else n.args[1]
    dims = list(dims[0] if len(dims) == 1 and isinstance(dims[0], list | tuple) else dims)
    return w.op("Transpose", [x], hint, perm=dims)


_HANDLERS = {
    "quant": _quant,
    "conv": _conv,
    "linear": _linear,
    "relu": _fused(_unary("Relu")),
    "relu6": _fused(_clip),
    "hardtanh": _fused(_clip),
    "sigmoid": _unary("Sigmoid"),
    "hardsigmoid": _unary("HardSigmoid", alpha=1.0 / 6, beta=0.5),
    "hardswish": _unary("HardSwish"),
    "tanh": _unary("Tanh"),
    "silu": _silu,
    "gelu": _gelu,
    "add": _binary("Add"),
    "sub": _binary("Sub"),
    "mul": _binary("Mul"),
    "div": _binary("Div"),
    "cat": _cat,
    "mean": _mean,
    "avgpool": _avgpool,
    "adaptive_avgpool": _adaptive_avgpool,
    "maxpool": _maxpool,
    "batchnorm": _batchnorm,
    "identity": _identity,
    "flatten": _flatten,
    "reshape": _reshape,
    "getitem": _getitem,
    "pad": _pad,
    "permute": _permute,
    "squeeze": _reshape,
    "unsqueeze": _reshape,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "attention_softmax": _attention_softmax,
    "transpose": _transpose,
    "expand": _expand,
}
