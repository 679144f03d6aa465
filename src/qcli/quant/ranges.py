"""Range estimators: min-max, percentile and MSE, behind one small interface.

An estimator watches the tensors a quantizer sees (`update`) and then proposes its scale and
zero point (`qparams`). Weights are a single known tensor, so `weight_qparams` estimates them
directly, per channel.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from qcli.quant import primitives as P
from qcli.quant.spec import QuantSpec

# Samples kept per activation quantizer for percentile / MSE: enough for a 1e-4 tail estimate,
# small enough that a hundred quantizers fit in a few hundred MB.
SAMPLE_BUDGET = 1 << 19
PERCENTILE = 99.99
MSE_GRID = 64  # clipping ratios tried by the MSE search
MSE_SAMPLES = 1 << 17  # values the activation MSE search scores each ratio on
MSE_MIN_RATIO = 0.2


class RangeEstimator(Protocol):
    def update(self, x: Tensor) -> None: ...

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor]: ...


class MinMax:
    """The full observed range: never clips, so outliers stretch the grid."""

    def __init__(self) -> None:
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))

    def update(self, x: Tensor) -> None:
        x = x.float()
        self.lo = torch.minimum(self.lo, x.min().cpu())
        self.hi = torch.maximum(self.hi, x.max().cpu())

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        if not torch.isfinite(self.lo):
            raise RuntimeError("range estimator saw no data")
        return P.qparams_from_range(self.lo, self.hi, spec.qmin, spec.qmax, spec.symmetric)


class _Sampled(MinMax):
    """Min-max plus a fixed-size random sample of the values, for tail-aware estimators."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.samples: list[Tensor] = []
        self.kept = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: Tensor) -> None:
        super().update(x)
        flat = x.detach().reshape(-1).float().cpu()
        take = min(flat.numel(), max(SAMPLE_BUDGET // 8, SAMPLE_BUDGET - self.kept))
        if take < flat.numel():
            idx = torch.randint(flat.numel(), (take,), generator=self.gen)
            flat = flat[idx]
        self.samples.append(flat if take < x.numel() else flat.clone())  # no view of x
        self.kept += flat.numel()
        if self.kept > 2 * SAMPLE_BUDGET:  # keep memory bounded over long runs
            allv = torch.cat(self.samples)
            idx = torch.randperm(allv.numel(), generator=self.gen)[:SAMPLE_BUDGET]
            self.samples, self.kept = [allv[idx]], SAMPLE_BUDGET

    def values(self) -> Tensor:
        return torch.cat(self.samples)


class Percentile(_Sampled):
    """Clip the 0.01% tails on both sides: robust to rare outliers, blind to the error."""

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        v = self.values()
        q = torch.tensor([(100 - PERCENTILE) / 100, PERCENTILE / 100])
        lo, hi = torch.quantile(v[: 1 << 24], q)
        return P.qparams_from_range(lo, hi, spec.qmin, spec.qmax, spec.symmetric)


class MSE(_Sampled):
    """Search the clipping range that minimizes the quantization error on the sample."""

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        v = self.values()
        if v.numel() > MSE_SAMPLES:
            v = v[torch.randperm(v.numel(), generator=self.gen)[:MSE_SAMPLES]]
        lo, hi = mse_search(v.unsqueeze(0), self.lo.reshape(1), self.hi.reshape(1), spec)
        return P.qparams_from_range(lo[0], hi[0], spec.qmin, spec.qmax, spec.symmetric)


def mse_search(rows: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """For each row, shrink [lo, hi] by the ratio that minimizes the squared error.

    One ratio for both ends keeps the search 1-D (the asymmetric grid still follows the data's
    own skew); rows are weight channels or one row of activation samples.
    """
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for r in torch.linspace(1.0, MSE_MIN_RATIO, MSE_GRID):
        c_lo, c_hi = lo * r, hi * r
        s, z = P.qparams_from_range(c_lo, c_hi, spec.qmin, spec.qmax, spec.symmetric)
        deq = P.fake_quantize(rows, s, z, spec.qmin, spec.qmax, axis=0)
        err = (deq - rows).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


ESTIMATORS: dict[str, type] = {"minmax": MinMax, "percentile": Percentile, "mse": MSE}


def make_estimator(method: str) -> RangeEstimator:
    try:
        return ESTIMATORS[method]()
    except KeyError:
        raise ValueError(f"unknown range estimator '{method}'") from None


@torch.no_grad()
def weight_qparams(w: Tensor, spec: QuantSpec, method: str) -> tuple[Tensor, Tensor]:
    """Scale and zero point for a weight, per output channel when the spec asks for it.

    Percentile is meaningless on a few hundred weights per channel, so it falls back to
    min-max; MSE searches each channel's clipping on the exact weights.
    """
    rows = w.detach().float().reshape(w.shape[0], -1) if spec.per_channel else w.reshape(1, -1)
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    if method == "mse":
        lo, hi = mse_search(rows, lo, hi, spec)
    s, z = P.qparams_from_range(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    return (s, z) if spec.per_channel else (s[0], z[0])
