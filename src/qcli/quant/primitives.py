"""The one place that does quantization arithmetic.

Calibration, QAT, data generation with a quantized model, the ONNX exporter and the
simulation that eval compares against all call these functions, so the rounding rule (round
half to even, as ONNX QuantizeLinear), the clamp and the order of operations (divide by the
scale, round, add the zero point, clamp) exist exactly once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


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
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Quantize then dequantize.

    Gradients: straight-through for the rounding, zero outside the clamp, and the LSQ gradient
    for `scale` (it falls out of autograd through `round_ste`).
    """
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)


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


def fake_quantize_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """Round a bias onto the int32 accumulator grid, as QLinearConv consumes it."""
    s = bias_scale(input_scale, weight_scale)
    return round_ste(bias / s) * s


INT32_MAX = 2**31 - 1
BIAS_LIMIT = 2**30  # calibrated biases stay below this many steps: int32 with headroom


def bias_fits_int32(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> bool:
    with torch.no_grad():
        q = torch.round(bias / bias_scale(input_scale, weight_scale))
        return bool(q.abs().max() <= INT32_MAX)
