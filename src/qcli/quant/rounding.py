"""Learned rounding (AdaRound): each weight is rounded down or up by a learned decision.

Plugs into `Quantizer.rounding`, which maps x / scale to grid values: this module returns
floor(x / scale) + h(V), soft during optimization and 0/1 once hardened, so the rest of the
quantizer (zero point, clamp, dequantize) and the exporter are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from qcli.quant.quantizer import Quantizer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches exactly 0 and 1


class AdaRound(nn.Module):
    """h(V) = clamp(sigmoid(V)(ζ − γ) + γ, 0, 1), initialized so that h(V) = frac(x / scale)."""

    def __init__(self, scaled: Tensor) -> None:
        super().__init__()
        frac = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.hard = False

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, scaled: Tensor) -> Tensor:
        up = (self.v >= 0).to(scaled.dtype) if self.hard else self.h()
        return torch.floor(scaled.detach()) + up

    def regularizer(self, beta: float) -> Tensor:
        """Σ 1 − |2h − 1|^β: zero only when every h is exactly 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def attach_adaround(q: Quantizer, weight: Tensor) -> AdaRound:
    """Give a weight quantizer a learned rounding initialized at round-to-nearest's fractions."""
    scale = q.scale.detach().reshape(-1, *([1] * (weight.ndim - 1)))
    q.rounding = AdaRound(weight.detach() / scale)
    return q.rounding


@torch.no_grad()
def bake_rounding(weight: nn.Parameter, q: Quantizer) -> None:
    """Write the hard-rounded grid values back into the float weight and drop the rounding.

    Round-half-even of the baked weight then lands on the same integers, so .qcli files,
    export and every later stage need no notion of learned rounding.
    """
    if q.rounding is None:
        return
    q.rounding.hard = True
    weight.copy_(q(weight))
    q.rounding = None


@contextlib.contextmanager
def rounding_restored(quantizers: Iterable[Quantizer]) -> Iterator[None]:
    """Whatever rounding is attached to these quantizers inside the block comes off on exit,
    also on an exception: each gets back the rounding it had (a look-ahead, such as MetaAug's
    meta phase, attaches learned rounding only to read its tensors)."""
    qs = list(quantizers)
    saved = [q.rounding for q in qs]
    try:
        yield
    finally:
        for q, old in zip(qs, saved, strict=True):
            q.rounding = old
