"""Quantized conv and linear layers: float modules whose weight (and int32 bias) pass through
the shared Quantizer on every forward, so gradients reach weights, scales and rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcli.quant import primitives as P
from qcli.quant.quantizer import Quantizer
from qcli.quant.spec import QuantSpec


class PaddedConv2d(nn.Conv2d):
    """A float conv with explicit (left, right, top, bottom) zero padding.

    Stands in for TF-style 'same' convolutions, whose padding timm computes from the input
    shape at run time (which torch.fx cannot trace); for a fixed input size it is constant.
    """

    pads: tuple[int, int, int, int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pads) if self.pads is not None else x)


class _WeightQuantMixin:
    """Shared weight/bias handling of QConv2d and QLinear."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: Quantizer | None

    def _init_quant(self, spec: QuantSpec | None) -> None:
        self.weight_quantizer = (
            Quantizer(spec, channels=self.weight.shape[0]) if spec is not None else None
        )
        # The quantizer feeding this layer; held in a list so it is not registered twice as a
        # submodule. Its scale sets the int32 bias grid, as onnxruntime's integer kernels do.
        self._input_quantizer: list[Quantizer] = []

    @property
    def input_quantizer(self) -> Quantizer | None:
        return self._input_quantizer[0] if self._input_quantizer else None

    def link_input_quantizer(self, q: Quantizer | None) -> None:
        self._input_quantizer = [q] if q is not None else []

    def _quant_active(self, q: Quantizer | None) -> bool:
        return q is not None and q.active

    def quantized_weight(self) -> Tensor:
        wq = self.weight_quantizer
        return wq(self.weight) if wq is not None else self.weight

    @torch.no_grad()
    def fit_bias_grid(self) -> int:
        """Raise weight scales so every bias fits int32 on the s_in x s_w grid; returns how
        many channels changed.

        A dead channel (weights ~0 after BN folding) gets a weight scale near zero, which puts
        its bias at ~1e10 accumulator steps: onnxruntime's integer conv then overflows it.
        Its weights round to 0 on any grid, so a coarser scale leaves the function as it was.
        Call after the input and weight quantizers are calibrated.
        """
        wq, iq = self.weight_quantizer, self.input_quantizer
        if self.bias is None or not (self._quant_active(wq) and self._quant_active(iq)):
            return 0
        floor = self.bias.detach().abs() / (iq.scale * P.BIAS_LIMIT)
        low = wq.scale < floor
        wq.scale.copy_(torch.where(low, floor, wq.scale))
        return int(low.sum())

    def quantized_bias(self) -> Tensor | None:
        """Bias on the int32 grid when both the weight and the input are quantized.

        A channel whose weights are all ~0 (a dead channel after BN folding) gets a tiny weight
        scale, and its bias may not fit int32 on that grid: such a layer keeps a float bias,
        here and in the export alike (onnxruntime then runs that one layer unfused).
        """
        wq, iq = self.weight_quantizer, self.input_quantizer
        if self.bias is None or not (self._quant_active(wq) and self._quant_active(iq)):
            return self.bias
        if not P.bias_fits_int32(self.bias, iq.scale, wq.scale):
            return self.bias
        return P.fake_quantize_bias(self.bias, iq.scale, wq.scale)

    @torch.no_grad()
    def integer_bias(self) -> Tensor | None:
        """The int32 bias an integer kernel adds to its accumulator (int64 values), on the
        grid s_in x s_w; None without a bias or where the bias stays float (`quantized_bias`).
        The ONNX file stores exactly these integers and the exact mode adds them."""
        if self.bias is None or self.quantized_bias() is self.bias:
            return None
        s_in, s_w = self.input_quantizer.scale.float(), self.weight_quantizer.scale.float()
        return P.bias_codes(self.bias.detach().float(), s_in, s_w).to(torch.int64)


class QConv2d(_WeightQuantMixin, nn.Conv2d):
    """Conv2d with quantized weights; `pads` holds explicit (left, right, top, bottom) padding
    for TF-style 'same' convolutions, which ONNX expresses as asymmetric Conv pads."""

    pads: tuple[int, int, int, int] | None = None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec | None) -> QConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        q.weight = nn.Parameter(conv.weight.detach().clone())
        if conv.bias is not None:
            q.bias = nn.Parameter(conv.bias.detach().clone())
        q.pads = getattr(conv, "pads", None)
        q._init_quant(spec)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self.with_weights(x, self.quantized_weight(), self.quantized_bias())

    def with_weights(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The layer's function with weight `w` and bias `b` (its padding included): what a
        change of the weights does to the output."""
        if self.pads is not None:
            x = F.pad(x, self.pads)
        return self._conv_forward(x, w, b)


class QLinear(_WeightQuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, lin: nn.Linear, spec: QuantSpec | None) -> QLinear:
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        q.weight = nn.Parameter(lin.weight.detach().clone())
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone())
        q._init_quant(spec)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self.with_weights(x, self.quantized_weight(), self.quantized_bias())

    def with_weights(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)
