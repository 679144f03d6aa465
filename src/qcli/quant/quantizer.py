"""The quantizer module: a QuantSpec plus its learnable scale and zero point."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from qcli.quant import primitives as P
from qcli.quant.spec import QuantSpec

# A rounding override (e.g. AdaRound's learned up/down decision): maps x / scale to grid
# values before the zero point is added. None means round half to even.
Rounding = Callable[[Tensor], Tensor]


class Quantizer(nn.Module):
    """Fake-quantizes a tensor; the same object is read by calibration, QAT and the exporter.

    States:
    - `observer` set: passes x through unchanged and feeds it to the range estimator;
    - `enabled` False: passes x through (used to measure FP behaviour inside a quantized graph);
    - otherwise: `fake_quantize` with the stored scale and zero point.
    `scale` is an nn.Parameter (frozen by default) so LSQ-style methods can learn it.
    `drop_prob` > 0 (QDrop, during reconstruction only) keeps each element in float with that
    probability, so the unit learns to be robust to its neighbours' quantization noise.
    `fused` False selects the composed elementwise graph and float32 `rand_like` masks: the
    reference that tests and `benchmarks/engine_profile.py` compare the fused path against.
    """

    fused = True  # a class default, so quantizers pickled before it existed still load
    drop_generator: torch.Generator | None = None  # QDrop's masks; set by the run that drops

    def __init__(self, spec: QuantSpec, channels: int | None = None) -> None:
        super().__init__()
        if spec.per_channel and not channels:
            raise ValueError("a per-channel quantizer needs its channel count")
        shape = (channels,) if spec.per_channel else ()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("calibrated", torch.tensor(False))
        self.enabled = True
        self.observer = None
        self.rounding: nn.Module | None = None
        self.drop_prob = 0.0

    @property
    def axis(self) -> int | None:
        return 0 if self.spec.per_channel else None

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
            self.calibrated.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
            return x
        if not self.enabled:
            return x
        keep = None  # QDrop: elements that stay float
        if self.drop_prob > 0 and self.fused:
            keep = P.random_mask_like(x, self.drop_prob, self.drop_generator)
        elif self.drop_prob > 0:
            g = self.drop_generator
            keep = torch.rand(x.shape, generator=g, device=x.device) < self.drop_prob
        s = self.spec
        if self.rounding is None and self.fused:
            return P.fake_quantize(
                x, self.scale, self.zero_point, s.qmin, s.qmax, self.axis, keep=keep
            )
        y = P.dequantize(self._grid(x), self.scale, self.zero_point, self.axis)
        return y if keep is None else torch.where(keep, x, y)

    def _grid(self, x: Tensor) -> Tensor:
        """Integer grid values (as float): round half to even, or the learned rounding."""
        s = self.spec
        if self.rounding is None:
            return P.quantize(x, self.scale, self.zero_point, s.qmin, s.qmax, self.axis)
        scale = P._broadcast(self.scale, x, self.axis)
        zp = P._broadcast(self.zero_point, x, self.axis)
        return torch.clamp(self.rounding(x / scale) + zp, s.qmin, s.qmax)

    @torch.no_grad()
    def quantize_int(self, x: Tensor) -> Tensor:
        """Integer values for export: the same arithmetic as forward, without the dequantize."""
        return self._grid(x).round().to(torch.int32)

    def extra_repr(self) -> str:
        s = self.spec
        gran = "per-channel" if s.per_channel else "per-tensor"
        kind = "int" if s.signed else "uint"
        sym = "symmetric" if s.symmetric else "asymmetric"
        return f"{kind}{s.bits}, {sym}, {gran}"
