"""The one place that does quantization arithmetic.

Calibration, QAT, data generation with a quantized model, the ONNX exporter and the
simulation that eval compares against all call these functions, so the rounding rule (round
half to even, as ONNX QuantizeLinear), the clamp and the order of operations (divide by the
scale, round, add the zero point, clamp) exist exactly once.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def round_ste(x: Tensor) -> Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class _GradScale(torch.autograd.Function):
    """Identity forward (bit for bit), gradient times g backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, t: Tensor, g: float) -> Tensor:
        ctx.g = g
        return t.view_as(t)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.g, None


def grad_scale(t: Tensor, g: float) -> Tensor:
    """LSQ's step-size gradient scale: t unchanged forward, its gradient times g.

    LSQ writes it (t - t·g).detach() + t·g, whose forward value can differ from t in the
    last bit; this keeps training's grid exactly the one export writes."""
    return _GradScale.apply(t, g)


def lsq_gradient_scale(elements: int, qmax: int) -> float:
    """g = 1/sqrt(N·Q_P): N the elements sharing one step size, Q_P the top grid value."""
    return 1.0 / math.sqrt(max(elements, 1) * max(qmax, 1))


def _broadcast(t: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Shape a per-channel parameter so it broadcasts along `axis` of `x`."""
    if t.ndim == 0 or axis is None:
        return t
    shape = [1] * x.ndim
    shape[axis] = -1
    return t.reshape(shape)


def quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Integer grid values (as float) exactly as QuantizeLinear computes them."""
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis)
    return torch.clamp(round_ste(x / s) + z, qmin, qmax)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    s = _broadcast(scale, q, axis)
    z = _broadcast(zero_point, q, axis)
    return (q - z) * s


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """Quantize then dequantize, in one fused autograd node.

    Bit for bit what `fake_quantize_composed` gives, values and gradients (straight-through
    for the rounding, zero outside the clamp, the LSQ gradient for `scale`), without the
    composed graph's full-size temporaries (eight in forward, two of them kept for backward,
    about a dozen more in backward): on a CPU, allocating and walking them is most of what
    reconstruction spends outside the convolutions. `keep` (bool, x's shape): elements that
    stay float (QDrop). Other dtypes or broadcasts take the composed graph.
    """
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis)
    if not _fusable(x, s, z, keep):
        return fake_quantize_composed(x, scale, zero_point, qmin, qmax, axis, keep)
    return _FakeQuantize.apply(x, s, z, qmin, qmax, keep)


def fake_quantize_composed(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """`fake_quantize` as plain autograd ops: the reference the fused node is checked against.

    Gradients: straight-through for the rounding, zero outside the clamp, and the LSQ gradient
    for `scale` (it falls out of autograd through `round_ste`).
    """
    y = dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)
    return y if keep is None else torch.where(keep, x, y)


def random_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bool mask, each element True with probability p (rounded to a multiple of 2**-16).

    QDrop draws one per quantizer call; 16 random bits per element (four per int64 draw)
    cost less than half what a float32 `rand` per element does, in time and memory.
    p = 0.5 is exact.
    """
    n = 1
    for d in shape:
        n *= d
    k = round(p * 65536)
    if k <= 0 or k >= 65536:
        return torch.full(tuple(shape), k > 0, dtype=torch.bool, device=device)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    bits.random_(-(2**63), None, generator=generator)  # all 64 bits uniform
    return bits.view(torch.int16)[:n].view(tuple(shape)) < k - 32768


def random_mask_like(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """`random_mask` for x's shape, laid out in memory like x (e.g. channels_last), so that
    elementwise work between them, and the fused quantizer's fast path, walk memory in step."""
    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))  # outermost dimension first
    mask = random_mask([x.shape[d] for d in order], p, x.device, generator)
    return mask.permute([order.index(d) for d in range(x.ndim)])


# ------------------------------------------------------------------ the fused fake quantizer


def _clamp_gradient_at_limits() -> float:
    """What autograd gives a clamp input exactly at a Scalar limit (0 in the torch this was
    written against; torch releases have differed): the fused backward must match the
    composed graph there, and grid values are integers, so they do land on the limits."""
    with torch.inference_mode(False), torch.enable_grad():
        v = torch.tensor([0.0, 1.0], requires_grad=True)
        torch.clamp(v, 0, 1).sum().backward()
    grads = {float(g) for g in v.grad}
    return grads.pop() if len(grads) == 1 else float("nan")


_LIMIT_GRAD = _clamp_gradient_at_limits()
# CPU tensors above this many elements are processed in pieces that stay in cache.
PIECE = 1 << 20


def _fusable(x: Tensor, s: Tensor, z: Tensor, keep: Tensor | None) -> bool:
    """Cases where the fused node reproduces the composed graph exactly (same dtypes, so no
    type promotion; the broadcast keeps x's shape; a known clamp gradient at the limits)."""
    return (
        _LIMIT_GRAD in (0.0, 1.0)
        and x.dtype in _BITS
        and x.dtype == s.dtype == z.dtype
        and torch.broadcast_shapes(x.shape, s.shape, z.shape) == x.shape
        and (keep is None or (keep.dtype == torch.bool and keep.shape == x.shape))
    )


def _piecewise() -> bool:
    """Cache-sized pieces pay off with one thread or passive OpenMP waits; with spinning
    threads on shared cores, the many small parallel regions can stall for milliseconds."""
    return torch.get_num_threads() == 1 or os.environ.get("OMP_WAIT_POLICY", "") == "PASSIVE"


def _dense(t: Tensor) -> bool:
    """Non-overlapping and gap-free, in any dimension order (contiguous, channels_last, ...):
    its memory is one block that can be walked flat."""
    expected = 1
    dims = zip(t.stride(), t.shape, strict=True)
    for stride, size in sorted((st, sz) for st, sz in dims if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n != 1
    )


def _broadcast_scalar(t: Tensor) -> bool:
    """Every stride 0: what `y.sum().backward()` sends back as the gradient."""
    return all(st == 0 for st in t.stride())


def _layout_ok(x: Tensor, *others: Tensor | None) -> bool:
    """x dense and every other tensor laid out like it (or a broadcast scalar): then the
    composed graph's full-size products all take x's layout, as the fused buffers do, and
    sums over them agree bit for bit."""
    return _dense(x) and all(
        t is None or _same_layout(t, x) or _broadcast_scalar(t) for t in others
    )


Piece = tuple[tuple[str, int, int] | None, Tensor, Tensor]


def _pieces(x: Tensor, s: Tensor, z: Tensor, *tensors: Tensor | None) -> list[Piece]:
    """(index, scale, zero point) per piece: one piece (index None) unless x is a large dense
    CPU tensor; then flat ranges of memory for a per-tensor grid, row groups of dim 0 (when
    it is the outermost) otherwise, the per-channel parameters sliced along with them."""
    n = x.numel()
    if x.device.type != "cpu" or n <= 2 * PIECE or not _piecewise():
        return [(None, s, z)]
    if not _layout_ok(x, *tensors):
        return [(None, s, z)]
    if s.numel() == 1 and z.numel() == 1:
        s0, z0 = s.reshape(()), z.reshape(())
        return [(("flat", lo, min(lo + PIECE, n)), s0, z0) for lo in range(0, n, PIECE)]
    rows = x.shape[0]
    if x.stride(0) * rows != n:  # dim 0 is not the outermost: rows are not blocks
        return [(None, s, z)]
    step = max(1, PIECE // max(1, x[0].numel()))
    out: list[Piece] = []
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        sc = s[lo:hi] if s.ndim == x.ndim and s.shape[0] > 1 else s
        zc = z[lo:hi] if z.ndim == x.ndim and z.shape[0] > 1 else z
        out.append((("rows", lo, hi), sc, zc))
    return out


def _flat(t: Tensor) -> Tensor:
    """A dense tensor's memory as 1-D (a broadcast scalar stays one repeated element)."""
    return t.as_strided((t.numel(),), (0,) if _broadcast_scalar(t) else (1,))


def _part(t: Tensor, index: tuple[str, int, int] | None) -> Tensor:
    if index is None:
        return t
    kind, lo, hi = index
    return _flat(t)[lo:hi] if kind == "flat" else t[lo:hi]


def _round_as_ste_(u: Tensor, zero: Tensor) -> Tensor:
    """In place, the value `round_ste` computes, u + (round(u) - u): round(u), except NaN
    where u is infinite (inf - inf); u + u * 0 makes that NaN in the same pass."""
    return u.addcmul_(u, zero).round_()


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32}
_BITS.update(dict.fromkeys((torch.float16, torch.bfloat16), torch.int16))


def _bits(t: Tensor) -> Tensor:
    """The same memory as integers: selecting bit patterns with & and ^ is exactly
    `torch.where` (signed zeros and NaNs included) at a twentieth of its CPU cost."""
    return t.view(_BITS[t.dtype])


def _scratch(x: Tensor, pieces: list[Piece], dtype: torch.dtype) -> Tensor:
    """A flat buffer for the largest piece, reused by every piece."""
    return torch.empty(max(_part(x, i).numel() for i, _, _ in pieces), dtype=dtype, device=x.device)


def _head(buffer: Tensor, like: Tensor) -> Tensor:
    """The start of a scratch buffer, laid out like `like` (dense), so that elementwise ops
    between them walk memory in step."""
    return buffer[: like.numel()].as_strided(like.shape, like.stride())


def _select_mask_(out: Tensor, keep: Tensor) -> Tensor:
    """`out` (integers) := all ones where `keep`, else 0."""
    return out.copy_(keep).neg_()


class _FakeQuantize(torch.autograd.Function):
    """y = (clamp(round(x / s) + z, qmin, qmax) - z) * s, where(keep, x, y) when keep is given.

    Forward is one output buffer updated in place (per cache-sized piece on a CPU); backward
    recomputes the grid from x instead of keeping temporaries, and replays the composed
    graph's float operations in the same order, so every gradient matches bit for bit.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        s: Tensor,
        z: Tensor,
        qmin: int,
        qmax: int,
        keep: Tensor | None,
    ) -> Tensor:
        pieces = _pieces(x, s, z, keep)
        y = torch.empty_like(x) if pieces[0][0] is not None else None
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if keep is not None:
            k_all, t_all = (_scratch(x, pieces, _BITS[x.dtype]) for _ in "kt")
        for index, sc, zc in pieces:
            xc = _part(x, index)
            # True division, as QuantizeLinear: x * (1 / s) rounds differently.
            yc = torch.div(xc, sc) if y is None else torch.div(xc, sc, out=_part(y, index))
            _round_as_ste_(yc, zero).add_(zc).clamp_(qmin, qmax).sub_(zc).mul_(sc)
            if keep is not None:  # yc := where(keep, x, y)
                k = _select_mask_(_head(k_all, xc), _part(keep, index))
                t = torch.bitwise_xor(_bits(xc), _bits(yc), out=_head(t_all, xc))
                _bits(yc).bitwise_xor_(t.bitwise_and_(k))
            y = yc if y is None else y
        ctx.save_for_backward(x, s, z, keep)
        ctx.limits = (qmin, qmax)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, s, z, keep = ctx.saved_tensors
        qmin, qmax = ctx.limits
        need = ctx.needs_input_grad[:3]
        if _layout_ok(x, grad, keep):
            grads = _fused_grads(x, s, z, qmin, qmax, keep, grad, need)
        else:
            grads = _composed_grads(x, s, z, qmin, qmax, keep, grad, need)
        return (*grads, None, None, None)


def _composed_grads(
    x: Tensor,
    s: Tensor,
    z: Tensor,
    qmin: int,
    qmax: int,
    keep: Tensor | None,
    grad: Tensor,
    need: tuple[bool, ...],
) -> list[Tensor | None]:
    """Autograd through the composed graph, for mixed layouts (x and its gradient in different
    memory orders): the composed graph would lay its products out, and so sum them, in an
    order the fused buffers do not reproduce. Costs a second forward; rare in practice."""
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(n) for t, n in zip((x, s, z), need, strict=True)]
        y = fake_quantize_composed(*xs, qmin, qmax, None, keep)
        wanted = [t for t in xs if t.requires_grad]
        got = iter(torch.autograd.grad(y, wanted, grad) if wanted else ())
    return [next(got) if n else None for n in need]


def _fused_grads(
    x: Tensor,
    s: Tensor,
    z: Tensor,
    qmin: int,
    qmax: int,
    keep: Tensor | None,
    grad: Tensor,
    need: tuple[bool, ...],
) -> list[Tensor | None]:
    """The composed graph's backward, op for op, with its temporaries reused.

    With u = x / s, q = clamp(round(u) + z), g' = where(keep, 0, g) (g without keep) and
    m = qmin < round(u) + z < qmax (<= where autograd passes the gradient at the limits),
    autograd through the composed graph computes
      dx = where(m, g' * s, 0) / s  [+ where(keep, g, 0)]
      ds = sum(g' * (q - z)) + sum(-where(m, g' * s, 0) * (u / s))
      dz = sum(-(g' * s)) + sum(where(m, g' * s, 0))
    The sums run over full contiguous product tensors, as autograd's own reduction to the
    parameter's shape does, so even their rounding agrees; -a * b is computed as
    a * (b / -s), which IEEE arithmetic makes identical.
    """
    need_x, need_s, need_z = need
    pieces = _pieces(x, s, z, keep)
    bits = _BITS[x.dtype]

    def full() -> Tensor:
        return torch.empty_like(x)  # x's layout (x is dense)

    gx = full() if need_x else None
    p1, p2 = (full(), full()) if need_s else (None, None)
    pz1, pz2 = (full(), full()) if need_z else (None, None)
    u_all = _scratch(x, pieces, x.dtype) if gx is None else gx
    m_all, m2_all = _scratch(x, pieces, bits), _scratch(x, pieces, bits)
    if keep is not None:
        k_all, w_all, g_all = (_scratch(x, pieces, bits) for _ in "kwg")
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    inside, below = (torch.gt, torch.lt) if _LIMIT_GRAD == 0.0 else (torch.ge, torch.le)
    for index, sc, zc in pieces:
        xc, gc = _part(x, index), _part(grad, index)
        u = _part(gx, index) if gx is not None else _head(u_all, xc)
        gq = gc  # the gradient that reaches the quantized branch
        if keep is not None:
            k = _select_mask_(_head(k_all, xc), _part(keep, index))
            w = torch.bitwise_and(_bits(gc), k, out=_head(w_all, xc))  # where(keep, g, 0)
            gq = torch.bitwise_xor(_bits(gc), w, out=_head(g_all, xc)).view(x.dtype)
        torch.div(xc, sc, out=u)
        if p2 is not None:
            d = torch.div(u, -sc, out=_part(p2, index))
        _round_as_ste_(u, zero).add_(zc)
        m = inside(u, qmin, out=_head(m_all, xc))
        m.bitwise_and_(below(u, qmax, out=_head(m2_all, xc))).neg_()
        if p1 is not None:
            torch.clamp(u, qmin, qmax, out=_part(p1, index)).sub_(zc).mul_(gq)
        a = torch.mul(gq, sc, out=u)
        if pz1 is not None:
            torch.neg(a, out=_part(pz1, index))
        _bits(a).bitwise_and_(m)  # where(m, a, 0)
        if pz2 is not None:
            _part(pz2, index).copy_(a)
        if p2 is not None:
            d.mul_(a)
        if gx is not None:
            a.div_(sc)
            if keep is not None:
                a.add_(w.view(x.dtype))
    ds = p1.sum_to_size(s.shape) + p2.sum_to_size(s.shape) if p1 is not None else None
    dz = pz1.sum_to_size(z.shape) + pz2.sum_to_size(z.shape) if pz1 is not None else None
    return [gx, ds, dz]


def qparams_from_range(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Scale and zero point covering [lo, hi].

    The range is widened to include 0 so that zero (padding, ReLU output) is exact. Symmetric
    grids use max(|lo|, |hi|) / qmax and zero point 0; asymmetric ones map lo..hi onto
    qmin..qmax with an integer zero point.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo)).float()
    hi = torch.maximum(hi, torch.zeros_like(hi)).float()
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / qmax, min=eps)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def bias_scale(input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """int32 bias grid of an integer conv/matmul: input scale times per-channel weight scale."""
    return input_scale * weight_scale


def bias_codes(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """The int32 integers (as float) an integer kernel adds to its accumulator: the bias on
    the grid input scale x weight scale, rounded half to even."""
    return torch.round(bias / bias_scale(input_scale, weight_scale))


def fake_quantize_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """Round a bias onto the int32 accumulator grid, as QLinearConv consumes it."""
    s = bias_scale(input_scale, weight_scale)
    return round_ste(bias / s) * s


INT32_MAX = 2**31 - 1
BIAS_LIMIT = 2**30  # calibrated biases stay below this many steps: int32 with headroom


def bias_fits_int32(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> bool:
    with torch.no_grad():
        return bool(bias_codes(bias, input_scale, weight_scale).abs().max() <= INT32_MAX)
