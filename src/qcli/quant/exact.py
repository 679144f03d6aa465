"""Integer-exact evaluation: what onnxruntime's fused integer kernels compute, bit for bit.

The training-time simulation (`Quantizer`, `QConv2d`) convolves dequantized values in
float32, so its sums round in their own order; onnxruntime's integer kernels accumulate
(x - z_x)·w_q exactly in int32 and requantize once with a float32 multiplier. Near a
rounding boundary the two land one step apart, and the step cascades. This module walks the
same fx graph with onnxruntime's arithmetic instead:

- conv / Gemm / MatMul (QLinearConv, QGemm, QLinearMatMul): the int32 accumulator, held
  exactly in float64, plus the int32 bias; requantized as `MlasRequantizeOutput` does it:
  float32(acc) · float32(float32(s_x · s_w) / s_y), clamped to the storage range less the
  zero point, rounded half to even, plus the zero point. A Gemm whose output stays float
  (the logits) gives float32(acc) · float32(s_x · s_w);
- Add, global / windowed average pooling: onnxruntime's QLinear kernels (`_add`, `_pool`);
- an activation between an integer op and its quantizer (ReLU, ReLU6) acts on the grid
  values of the requantized output (the exporter writes exactly that where onnxruntime would
  not drop it), and a grid narrower than 8 bits clamps the 8-bit codes;
- data movement moves codes; every other op runs in float32 on dequantized values, as
  onnxruntime runs it between DequantizeLinear and QuantizeLinear (those are the only places
  where it and this module can round differently: `ExactResult.float_ops` lists them).

Matches onnxruntime ONNXRUNTIME_VERSION's CPU kernels (verified op by op in
tests/test_exact.py); the exporter records the version in each file's metadata.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qcli.quant import ops
from qcli.quant.modules import QConv2d, QLinear
from qcli.quant.quantizer import Quantizer

ONNXRUNTIME_VERSION = "1.32.0"
_IDENTITY_OPS = ("identity",)


# -- the arithmetic -------------------------------------------------------------------------


def storage_range(signed: bool) -> tuple[int, int]:
    """The 8-bit container's codes: what onnxruntime's kernels saturate to."""
    return (-128, 127) if signed else (0, 255)


def quantize_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor, lo: int = 0, hi: int = 255
) -> Tensor:
    """QuantizeLinear: x / scale (true division in float32), round half to even, plus the
    zero point, saturated to [lo, hi]. Codes are float32 tensors holding integers."""
    return torch.clamp(torch.round(x.float() / scale) + zero_point, lo, hi)


def dequantize_codes(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """DequantizeLinear: (q - z) · scale in float32."""
    return (codes - zero_point) * scale


def requantize(acc: Tensor, multiplier: Tensor, zero_point: Tensor, lo: int, hi: int) -> Tensor:
    """MlasRequantizeOutput: float32(acc) · multiplier, clamped to [lo - z, hi - z], rounded
    half to even (cvtps2dq in the default rounding mode), plus z. `acc` holds exact integers
    (float64); its conversion to float32 rounds to nearest even, as cvtdq2ps does."""
    y = acc.to(torch.float32) * multiplier
    y = torch.clamp(y, float(lo - zero_point), float(hi - zero_point))
    return torch.round(y) + zero_point


def output_multiplier(s_in: Tensor, s_w: Tensor, s_out: Tensor) -> Tensor:
    """QLinearConv's / QGemm's requantization scale: float32(float32(s_in · s_w) / s_out)."""
    return (s_in.float() * s_w.float()) / s_out.float()


def activation_bounds(n: fx.Node, m: nn.Module | None) -> tuple[float, float]:
    """The clip an activation fused into an integer kernel applies: ReLU (0, inf), ReLU6
    (0, 6), hardtanh (its bounds)."""
    if (m is not None and isinstance(m, nn.ReLU6)) or n.target is F.relu6:
        return 0.0, 6.0
    if (m is not None and isinstance(m, nn.Hardtanh)) or n.target is F.hardtanh:
        if m is not None:
            return float(m.min_val), float(m.max_val)
        args = [*n.args[1:], None, None]
        lo = args[0] if args[0] is not None else n.kwargs.get("min_val", -1.0)
        hi = args[1] if args[1] is not None else n.kwargs.get("max_val", 1.0)
        return float(lo), float(hi)
    return 0.0, math.inf


# -- values flowing through the graph -------------------------------------------------------


@dataclass(frozen=True)
class Codes:
    """A quantized tensor: integer codes (float32) on the grid (scale, zero point)."""

    q: Tensor
    scale: Tensor
    zero_point: Tensor
    signed: bool = False

    def dequantize(self) -> Tensor:
        return dequantize_codes(self.q, self.scale, self.zero_point)

    def moved(self, values: Tensor) -> Codes:
        """The same grid for values that data movement took from this tensor."""
        lo, hi = storage_range(self.signed)
        return Codes(
            quantize_codes(values, self.scale, self.zero_point, lo, hi),
            self.scale,
            self.zero_point,
            self.signed,
        )


@dataclass(frozen=True)
class Accumulator:
    """An integer kernel's result before its QuantizeLinear: `requantize(scale, zero point,
    lo, hi)` gives the codes onnxruntime's fused kernel writes, `to_float()` what it computes
    when no quantizer reads the result; `post` are fused activations, applied on grid values."""

    requantize: Callable[[Tensor, Tensor, int, int], Tensor]
    to_float: Callable[[], Tensor]
    post: tuple[tuple[float, float], ...] = ()
    name: str = ""
    float_is_exact: bool = False  # QGemm's float output is integer arithmetic plus one scale


Value = Tensor | Codes | Accumulator


def _materialize(v: object, floats: list[str]) -> object:
    """What a float op reads: dequantized codes, an integer op's float output. An integer op
    that onnxruntime then runs in float (no QuantizeLinear follows it) goes to `floats`."""
    if isinstance(v, Codes):
        return v.dequantize()
    if isinstance(v, Accumulator):
        if not v.float_is_exact:
            floats.append(v.name)
        out = v.to_float()
        for lo, hi in v.post:
            out = torch.clamp(out, lo, hi)
        return out
    if isinstance(v, list | tuple):
        return type(v)(_materialize(a, floats) for a in v)
    if isinstance(v, dict):
        return {k: _materialize(a, floats) for k, a in v.items()}
    return v


# -- the integer kernels --------------------------------------------------------------------


FLOAT32_EXACT = 2**24  # integers up to here, and every partial sum below it, are exact


def _sum_bound(x: Tensor, weight_sum: Tensor, bias: Tensor | None) -> float:
    """An upper bound on every partial sum of an integer dot product: max|x| times the
    largest sum of |w| over one output, plus the largest |bias|."""
    bound = float(x.abs().max()) * float(weight_sum) if x.numel() else 0.0
    return bound + (float(bias.abs().max()) if bias is not None and bias.numel() else 0.0)


def exact_dtype(bound: float, device: torch.device) -> torch.dtype:
    """float32 where every partial sum stays below 2**24 (then any summation order is exact,
    and 4-8x faster than float64 on a CPU), float64 (exact below 2**53) otherwise and on
    GPUs, whose float32 convolutions may round inputs to TF32."""
    return torch.float32 if bound < FLOAT32_EXACT and device.type == "cpu" else torch.float64


def _layer(layer: QConv2d | QLinear, x: Codes, n: fx.Node) -> Accumulator | None:
    """QLinearConv / QGemm: exact int32 accumulation of (x - z_x)·w_q plus the int32 bias."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if wq is None or not wq.active or iq is None or not iq.active:
        return None
    bias = layer.integer_bias()
    if layer.bias is not None and bias is None:
        return None  # a float bias: onnxruntime runs the layer in float
    w = wq.quantize_int(layer.weight).float()
    xi = x.q - x.zero_point
    bound = _sum_bound(xi, w.abs().flatten(1).sum(1).max(), bias)
    dtype = exact_dtype(bound, xi.device)
    w, xi = w.to(dtype), xi.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    s_w = wq.scale.detach().float()
    if isinstance(layer, QConv2d):
        if layer.padding_mode != "zeros":
            return None
        if layer.pads is not None:
            xi = F.pad(xi, layer.pads)
        acc = F.conv2d(xi, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        shape = (1, -1, 1, 1)
    else:
        acc = F.linear(xi, w, b)  # rows of tokens: the exporter flattens them for the Gemm
        shape = (1,) * (xi.ndim - 1) + (-1,)

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        m = output_multiplier(x.scale, s_w, scale).reshape(shape)
        return requantize(acc, m, zp, lo, hi)

    def to_float() -> Tensor:
        if isinstance(layer, QLinear):  # QGemm with a float output: scale, no requantization
            return acc.to(torch.float32) * (x.scale.float() * s_w).reshape(shape)
        return layer(x.dequantize())  # onnxruntime's float conv on dequantized values

    name = f"layer '{n.target}'"
    return Accumulator(requant, to_float, name=name, float_is_exact=isinstance(layer, QLinear))


def fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 fused multiply-add, a·b + c rounded once, as vfmadd computes it.

    a·b of two float32 values is exact in float64; the float64 sum is made round-to-odd
    (nudged one ulp toward the exact sum when it was inexact and landed on an even
    mantissa), which makes the final rounding to float32 the correct single rounding."""
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    t = s - p  # TwoSum: e is the exact error of s = p + c
    e = (p - (s - t)) + (c - t)
    even = (s.view(torch.int64) & 1) == 0
    nudge = (e != 0) & even
    toward = torch.where(e > 0, torch.full_like(s, math.inf), torch.full_like(s, -math.inf))
    return torch.where(nudge, torch.nextafter(s, toward), s).float()


def _add(a: Codes, b: Codes, n: fx.Node) -> Accumulator:
    """QLinearAdd as MLAS runs it on AVX2 and newer x86: the ratios r_a = s_a / s_c and
    r_b = s_b / s_c, the offset f = z_c - fma(r_a, z_a, r_b·z_b), then
    fma(a, r_a, fma(b, r_b, f)) on the raw codes, rounded half to even and saturated."""
    qa, qb = a.q, b.q

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        ra, rb = a.scale / scale, b.scale / scale
        fixed = zp - fma32(ra, a.zero_point, rb * b.zero_point)
        y = fma32(qa, ra, fma32(qb, rb, fixed))
        return torch.clamp(torch.round(y), lo, hi)

    return Accumulator(requant, lambda: a.dequantize() + b.dequantize(), name=n.name)


def _global_pool(x: Codes, n: fx.Node, keepdim: bool) -> Accumulator:
    """QLinearGlobalAveragePool: the int32 sum of codes over H·W, minus z_x·H·W, requantized
    with float32(s_x / (s_y · H·W))."""
    size = x.q.shape[-1] * x.q.shape[-2]
    acc = x.q.double().sum(dim=(-2, -1), keepdim=keepdim) - float(x.zero_point) * size

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        m = x.scale / (scale * size)
        return requantize(acc, m, zp, lo, hi)

    mean = x.dequantize().mean
    return Accumulator(requant, lambda: mean(dim=(-2, -1), keepdim=keepdim), name=n.name)


def _matmul(a: Codes, b: Codes, n: fx.Node) -> Accumulator:
    """QLinearMatMul of two activations: exact int32 products, requantized like QGemm."""
    ai, bi = a.q - a.zero_point, b.q - b.zero_point
    k = ai.shape[-1]
    dtype = exact_dtype(_sum_bound(ai, bi.abs().max() * k, None), ai.device)
    acc = torch.matmul(ai.to(dtype), bi.to(dtype))

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        return requantize(acc, output_multiplier(a.scale, b.scale, scale), zp, lo, hi)

    return Accumulator(requant, lambda: acc.to(torch.float32) * (a.scale * b.scale), name=n.name)


def _mul(a: Codes, b: Codes, n: fx.Node) -> Accumulator:
    """QLinearMul: the exact product of offset codes times float32(float32(s_a·s_b) / s_c),
    plus z_c in float32 before rounding (no FMA), saturated. Broadcasts like the op."""
    p = (a.q - a.zero_point) * (b.q - b.zero_point)  # integers below 2**16: exact

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        ratio = (a.scale * b.scale) / scale
        return torch.clamp(torch.round(p * ratio + zp), lo, hi)

    return Accumulator(requant, lambda: a.dequantize() * b.dequantize(), name=n.name)


def _concat(parts: list[Codes], dim: int, n: fx.Node) -> Accumulator:
    """QLinearConcat: each input re-quantized onto the output grid through a table of
    QuantizeLinear(DequantizeLinear(q)), inputs already on it copied: both exact here."""
    values = torch.cat([p.dequantize() for p in parts], dim)

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        return quantize_codes(values, scale, zp, lo, hi)

    return Accumulator(requant, lambda: values, name=n.name)


# MLAS's logistic (x86 FMA3 kernel): Eigen's rational approximation on [-18, 18].
_ALPHA = (
    4.37031012579801e-11,
    1.15627324459942e-07,
    6.08574864600143e-05,
    8.51377133304701e-03,
    2.48287947061529e-01,
)
_BETA = (
    6.10247389755681e-13,
    5.76102136993427e-09,
    6.29106785017040e-06,
    1.70198817374094e-03,
    1.16817656904453e-01,
    9.93151921023180e-01,
)


def mlas_logistic(x: Tensor) -> Tensor:
    """The float32 sigmoid QLinearSigmoid tabulates: odd and even polynomials in x² by FMA
    (Horner), their ratio plus 0.5, clamped at 0 only."""
    x = torch.clamp(x.float(), -18.0, 18.0)
    x2 = x * x
    c = [torch.tensor(v, dtype=torch.float32) for v in _ALPHA]
    p = fma32(x2, c[0].expand_as(x2), c[1].expand_as(x2))
    for a in c[2:]:
        p = fma32(x2, p, a.expand_as(x2))
    p = x * p
    d = [torch.tensor(v, dtype=torch.float32) for v in _BETA]
    q = fma32(x2, d[0].expand_as(x2), d[1].expand_as(x2))
    for b in d[2:]:
        q = fma32(x2, q, b.expand_as(x2))
    return torch.clamp_min(p / q + 0.5, 0.0)


def _sigmoid(x: Codes, n: fx.Node) -> Accumulator:
    """QLinearSigmoid: a 256-entry table, QuantizeLinear(logistic(DequantizeLinear(q)))."""
    y = mlas_logistic(x.dequantize())

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        return quantize_codes(y, scale, zp, lo, hi)

    return Accumulator(requant, lambda: torch.sigmoid(x.dequantize()), name=n.name)


def _pool_args(n: fx.Node, m: nn.Module | None) -> tuple | None:
    """(kernel, stride, padding, count_include_pad) of a plain 2-D average pool, else None."""
    if m is not None:
        k, st, p = m.kernel_size, m.stride, m.padding
        ceil, cip, div = m.ceil_mode, m.count_include_pad, m.divisor_override
    else:
        args = [*n.args[1:], *[None] * 6]
        kw = n.kwargs
        k = args[0] if args[0] is not None else kw.get("kernel_size")
        st = args[1] if args[1] is not None else kw.get("stride")
        p = args[2] if args[2] is not None else kw.get("padding", 0)
        ceil = args[3] if args[3] is not None else kw.get("ceil_mode", False)
        cip = args[4] if args[4] is not None else kw.get("count_include_pad", True)
        div = args[5] if args[5] is not None else kw.get("divisor_override")

    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    if ceil or div is not None:
        return None
    return pair(k), pair(st or k), pair(p), bool(cip)


def _avgpool(x: Codes, n: fx.Node, m: nn.Module | None) -> Accumulator | None:
    """QLinearAveragePool, a float kernel: dequantized inputs summed one by one in row-major
    window order (padding skipped), divided by the count, then / s_y + z_y in float32
    before rounding."""
    args = _pool_args(n, m)
    if args is None:
        return None
    (kh, kw), (sh, sw), (ph, pw), cip = args
    xf = F.pad(x.dequantize(), (pw, pw, ph, ph))
    ones = F.pad(torch.ones_like(x.q[:1, :1]), (pw, pw, ph, ph))
    oh = (xf.shape[-2] - kh) // sh + 1
    ow = (xf.shape[-1] - kw) // sw + 1
    total = torch.zeros(*xf.shape[:-2], oh, ow)
    count = torch.zeros(1, 1, oh, ow)
    for i in range(kh):
        for j in range(kw):
            window = (..., slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw))
            total = total + xf[window]
            count = count + ones[window]
    avg = total / (float(kh * kw) if cip else count)

    def requant(scale: Tensor, zp: Tensor, lo: int, hi: int) -> Tensor:
        return torch.clamp(torch.round(avg / scale + zp), lo, hi)

    return Accumulator(requant, lambda: avg, name=n.name)


def _is_global_mean(n: fx.Node, x: Codes) -> bool:
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    rank = x.q.ndim
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    return rank == 4 and sorted(d % rank for d in dims) == [2, 3] and bool(keep)


def _is_global_adaptive(n: fx.Node, m: nn.Module | None) -> bool:
    size = m.output_size if m is not None else n.args[1]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size == (1, 1)


def _integer_kernel(n: fx.Node, op: ops.Op, m: nn.Module | None, args: list) -> Value | None:
    """The Accumulator of an op onnxruntime runs in an integer kernel, or None (float)."""
    x = args[0] if args and isinstance(args[0], Codes) else None
    if op.kind == ops.WEIGHTED and isinstance(m, QConv2d | QLinear) and x is not None:
        return _layer(m, x, n)
    pair = len(args) == 2 and all(isinstance(a, Codes) for a in args) and not n.kwargs
    if op.name == "add" and pair and args[0].q.shape == args[1].q.shape:
        return _add(args[0], args[1], n)
    if op.name == "matmul" and pair:
        return _matmul(args[0], args[1], n)
    if op.name == "mul" and pair:
        return _mul(args[0], args[1], n)
    if op.name == "cat" and args and isinstance(args[0], list | tuple):
        dim = args[1] if len(args) > 1 else n.kwargs.get("dim", 0)
        if all(isinstance(a, Codes) for a in args[0]):
            return _concat(list(args[0]), dim, n)
    if op.name == "sigmoid" and x is not None and len(args) == 1:
        return _sigmoid(x, n)
    if x is None or x.q.ndim != 4:
        return None
    if op.name == "avgpool":
        return _avgpool(x, n, m)
    if (op.name == "mean" and _is_global_mean(n, x)) or (
        op.name == "adaptive_avgpool" and _is_global_adaptive(n, m)
    ):
        return _global_pool(x, n, keepdim=True)
    return None


# -- the interpreter ------------------------------------------------------------------------


@dataclass
class ExactResult:
    """Logits, the codes of every activation quantizer (when recorded) and the ops that ran
    in float (where onnxruntime's float kernels may round differently)."""

    logits: Tensor
    codes: dict[str, Tensor] = field(default_factory=dict)
    float_ops: list[str] = field(default_factory=list)


def _call(n: fx.Node, mods: dict[str, nn.Module], args: Iterable, kwargs: dict) -> object:
    if n.op == "call_module":
        return mods[n.target](*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    self, *rest = args
    return getattr(self, n.target)(*rest, **kwargs)


def _load(env: dict[fx.Node, object], a: object) -> object:
    if isinstance(a, fx.Node):
        return env[a]
    if isinstance(a, list | tuple):
        return type(a)(_load(env, b) for b in a)
    if isinstance(a, dict):
        return {k: _load(env, b) for k, b in a.items()}
    if isinstance(a, slice):
        return slice(_load(env, a.start), _load(env, a.stop), _load(env, a.step))
    return a


def _quantize(v: object, q: Quantizer) -> Codes:
    """An activation quantizer: the fused kernel's codes, then its activations on grid values,
    then the narrower grid's clamp."""
    spec = q.spec
    lo, hi = storage_range(spec.signed)
    scale, zp = q.scale.detach().float(), q.zero_point.detach().float()
    if isinstance(v, Accumulator):
        c = v.requantize(scale, zp, lo, hi)
        for a, b in v.post:
            c = quantize_codes(torch.clamp(dequantize_codes(c, scale, zp), a, b), scale, zp, lo, hi)
    else:
        x = v.dequantize() if isinstance(v, Codes) else v
        c = quantize_codes(x, scale, zp, lo, hi)
    if (spec.qmin, spec.qmax) != (lo, hi):
        c = torch.clamp(c, spec.qmin, spec.qmax)
    return Codes(c, scale, zp, spec.signed)


@torch.no_grad()
def run_exact(gm: fx.GraphModule, x: Tensor, record: bool = False) -> ExactResult:
    """Evaluate a captured graph (`QuantGraph.module`) with onnxruntime's integer arithmetic.
    `record` keeps every activation quantizer's codes (for the export gate)."""
    mods = dict(gm.named_modules())
    env: dict[fx.Node, object] = {}
    result = ExactResult(torch.empty(0))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = x.float()
            continue
        if n.op == "get_attr":
            env[n] = operator.attrgetter(n.target)(gm)
            continue
        if n.op == "output":
            out = _materialize(_load(env, n.args[0]), result.float_ops)
            result.logits = out if isinstance(out, Tensor) else out[0]
            continue
        env[n] = _node(n, mods, env, result, record)
    return result


def _node(n: fx.Node, mods: dict, env: dict, result: ExactResult, record: bool) -> object:
    op = ops.classify(n, mods)
    m = mods.get(n.target) if n.op == "call_module" else None
    args, kwargs = list(_load(env, n.args)), _load(env, n.kwargs)
    if op.kind == ops.QUANT:
        if not m.active:
            return _materialize(args[0], result.float_ops)
        codes = _quantize(args[0], m)
        if record:
            result.codes[n.target] = codes.q
        return codes
    first = args[0] if args else None
    if isinstance(first, Accumulator) and not kwargs_hold_values(kwargs):
        if op.kind == ops.FUSABLE or op.name == "hardtanh":
            post = (*first.post, activation_bounds(n, m))
            return dataclasses.replace(first, post=post)
        if op.name in _IDENTITY_OPS:
            return first
    if op.integer and op.kind not in (ops.PASSTHROUGH, ops.QUANT, ops.FUSABLE):
        acc = _integer_kernel(n, op, m, args)
        if acc is not None:
            return acc
    floats = result.float_ops
    if op.kind == ops.PASSTHROUGH and isinstance(first, Codes):
        return _moved(
            first, _call(n, mods, _materialize(args, floats), _materialize(kwargs, floats))
        )
    if n.target is operator.getitem and isinstance(first, list | tuple):
        return first[args[1]]
    out = _call(n, mods, _materialize(args, floats), _materialize(kwargs, floats))
    if op.kind not in (ops.PASSTHROUGH, ops.FUSABLE) and _holds_tensor(out):
        floats.append(ops.describe(n, mods))
    return out


def _holds_tensor(v: object) -> bool:
    """Whether a node computed values (not a shape, an assertion or a dtype)."""
    if isinstance(v, list | tuple):
        return any(_holds_tensor(a) for a in v)
    return isinstance(v, Tensor)


def kwargs_hold_values(kwargs: dict) -> bool:
    return any(isinstance(v, Tensor | Codes | Accumulator) for v in kwargs.values())


def _moved(src: Codes, out: object) -> object:
    if isinstance(out, Tensor):
        return src.moved(out)
    if isinstance(out, list | tuple):
        return type(out)(_moved(src, o) for o in out)
    return out
