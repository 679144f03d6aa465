"""The quantizer module: a QuantSpec plus its learnable scale and zero point."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from qcli.quant import primitives as P
from qcli.quant.spec import QuantSpec

# A rounding override (e.g. AdaRound's learned up/down decision): maps x / scale to grid
# values before the zero point is added. None means round half to even.
Rounding = Callable[[Tensor], Tensor]


class QuantMode(enum.Enum):
    """What a quantizer does on forward: one value, set through `quant_mode` / `set_mode`."""

    QUANTIZE = "quantize"  # fake-quantize with the stored scale and zero point
    OFF = "off"  # pass x through: FP behaviour inside a quantized graph
    OBSERVE = "observe"  # pass x through and feed it to `observer` (range setting)
    LEARN = "learn"  # QUANTIZE with LSQ's gradient scale on the step size (QAT)


class Quantizer(nn.Module):
    """Fake-quantizes a tensor; the same object is read by calibration, QAT and the exporter.

    `mode` (a QuantMode) says what forward does; modes are entered with the `quant_mode`
    context manager (restored on exit, also on an exception) so no module flips another
    module's flags by hand. `scale` is an nn.Parameter (frozen by default) so LSQ-style
    methods can learn it. `drop_prob` > 0 (QDrop, inside `dropping` during reconstruction)
    keeps each element in float with that probability, so the unit learns to be robust to
    its neighbours' quantization noise. `fused` False selects the composed elementwise graph
    and float32 `rand_like` masks (inside `composed`): the reference that tests and
    `benchmarks/engine_profile.py` compare the fused path against.
    """

    fused = True  # a class default, so quantizers pickled before it existed still load
    drop_generator: torch.Generator | None = None  # QDrop's masks; set by the run that drops
    mode = QuantMode.QUANTIZE
    # LEARN on an activation: how many processes' slices make up one step's batch (torchrun).
    # LSQ's N counts the whole step's elements, so DDP's mean of the slices' step-size
    # gradients equals one process's gradient on the whole batch, whatever the process count.
    batch_replicas = 1

    def __init__(self, spec: QuantSpec, channels: int | None = None) -> None:
        super().__init__()
        if spec.per_channel and not channels:
            raise ValueError("a per-channel quantizer needs its channel count")
        shape = (channels,) if spec.per_channel else ()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("calibrated", torch.tensor(False))
        self.mode = QuantMode.QUANTIZE
        self.observer = None  # a range estimator, read in OBSERVE mode
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

    @property
    def active(self) -> bool:
        """Whether forward quantizes (the int32 bias grid exists only then)."""
        return self.mode in (QuantMode.QUANTIZE, QuantMode.LEARN)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode is QuantMode.OBSERVE:
            self.observer.update(x.detach())
            return x
        if self.mode is QuantMode.OFF:
            return x
        keep = None  # QDrop: elements that stay float
        if self.drop_prob > 0 and self.fused:
            keep = P.random_mask_like(x, self.drop_prob, self.drop_generator)
        elif self.drop_prob > 0:
            g = self.drop_generator
            keep = torch.rand(x.shape, generator=g, device=x.device) < self.drop_prob
        s = self.spec
        if self.mode is QuantMode.LEARN:
            return self._learn(x.float(), keep)
        if self.rounding is None and self.fused:
            return P.fake_quantize(
                x, self.scale, self.zero_point, s.qmin, s.qmax, self.axis, keep=keep
            )
        y = P.dequantize(self._grid(x), self.scale, self.zero_point, self.axis)
        return y if keep is None else torch.where(keep, x, y)

    def _learn(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """LSQ: the fused fake-quantizer (straight-through rounding, LSQ's step-size gradient)
        on a step size whose gradient is scaled by g = 1/sqrt(N·Q_P), N the elements sharing
        one step size (per channel for weights; the whole batch for activations, as ACS's
        code does, counted over all `batch_replicas` processes' slices). In float32 even
        under autocast: half precision cannot hold x / s exactly enough to round it as export
        does."""
        s = self.spec
        g = P.lsq_gradient_scale(x.numel() * self.batch_replicas // self.scale.numel(), s.qmax)
        scale = P.grad_scale(self.scale, g)
        return P.fake_quantize(x, scale, self.zero_point, s.qmin, s.qmax, self.axis, keep=keep)

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


def set_mode(quantizers: Iterable[Quantizer], mode: QuantMode) -> None:
    """Put quantizers in a mode for good (a float twin); `quant_mode` for a while."""
    for q in quantizers:
        q.mode = mode


@contextlib.contextmanager
def replicated(quantizers: Iterable[Quantizer], replicas: int) -> Iterator[None]:
    """Inside the block each step's batch is shared by `replicas` processes (torchrun), so
    LEARN scales the step-size gradient by the global batch; each quantizer's own count
    comes back on exit."""
    saved = [(q, q.batch_replicas) for q in quantizers]
    for q, _ in saved:
        q.batch_replicas = replicas
    try:
        yield
    finally:
        for q, n in saved:
            q.batch_replicas = n


@contextlib.contextmanager
def quant_mode(quantizers: Iterable[Quantizer], mode: QuantMode) -> Iterator[list[Quantizer]]:
    """Quantizers in `mode` inside the block; each gets its own previous mode back after it."""
    saved = [(q, q.mode) for q in quantizers]
    set_mode((q for q, _ in saved), mode)
    try:
        yield [q for q, _ in saved]
    finally:
        for q, m in saved:
            q.mode = m


@contextlib.contextmanager
def composed(quantizers: Iterable[Quantizer]) -> Iterator[None]:
    """The composed fake-quant graph instead of the fused node inside the block: the same
    values, but twice differentiable (MetaAug's second-order step) and the reference the
    fused path is checked against. Each quantizer's own setting comes back on exit."""
    qs = list(quantizers)
    saved = [q.__dict__.get("fused") for q in qs]
    for q in qs:
        q.fused = False
    try:
        yield
    finally:
        for q, old in zip(qs, saved, strict=True):
            if old is None:
                del q.fused  # back to the class default
            else:
                q.fused = old


@contextlib.contextmanager
def observing(
    quantizers: Iterable[Quantizer], make_observer: Callable[[], object]
) -> Iterator[list[Quantizer]]:
    """OBSERVE mode with a fresh range estimator each; the estimators are dropped on exit."""
    qs = list(quantizers)
    for q in qs:
        q.observer = make_observer()
    try:
        with quant_mode(qs, QuantMode.OBSERVE):
            yield qs
    finally:
        for q in qs:
            q.observer = None


@contextlib.contextmanager
def dropping(
    quantizers: Iterable[Quantizer], p: float, generator: torch.Generator | None = None
) -> Iterator[None]:
    """QDrop inside the block: each element stays float with probability p, the masks drawn
    from `generator` (the run's, so the global RNG never decides a result)."""
    qs = list(quantizers)
    for q in qs:
        q.drop_prob = p
        q.drop_generator = generator if p > 0 else None
    try:
        yield
    finally:
        for q in qs:
            q.drop_prob = 0.0
            q.drop_generator = None
