"""Quantization settings as values: they print, compare, hash and round-trip through JSON."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qcli.errors import UsageError

MIN_BITS = 2
MAX_BITS = 8

# 8-bit weights of layers that pair products (everything but depthwise convs) stay within
# ±SAFE_INT8_LIMIT under the default `--int8-range safe`: 255 · (64 + 64) = 32,640 fits the
# int16 pair sums of onnxruntime's u8×s8 kernels on x86 without VNNI (see export.kernels).
SAFE_INT8_LIMIT = 64
INT8_RANGES = ("safe", "full")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    `symmetric` pins the zero point at 0 (what integer weight kernels want); `per_channel`
    gives every output channel (axis 0) its own scale. `limit` narrows a signed grid to
    [-limit, limit] inside its bits (the saturation-safe 8-bit weight grid).
    """

    bits: int
    signed: bool
    symmetric: bool
    per_channel: bool
    limit: int | None = None

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise UsageError(f"{self.bits} bits is out of range: qcli quantizes to 2..8 bits")
        if self.symmetric and not self.signed:
            raise ValueError("a symmetric quantizer must be signed")
        if self.limit is not None and not (self.signed and 0 < self.limit < 2 ** (self.bits - 1)):
            raise ValueError(f"limit {self.limit} does not narrow a signed {self.bits}-bit grid")

    @property
    def qmin(self) -> int:
        if self.limit is not None:
            return -self.limit
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self.limit is not None:
            return self.limit
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        keys = ("bits", "signed", "symmetric", "per_channel")
        return cls(**{k: d[k] for k in keys}, limit=d.get("limit"))


def weight_spec(bits: int, limit: int | None = None) -> QuantSpec:
    """Per-channel symmetric int: what onnxruntime's integer conv kernels require of weights."""
    return QuantSpec(bits=bits, signed=True, symmetric=True, per_channel=True, limit=limit)


def activation_spec(bits: int, signed: bool = False) -> QuantSpec:
    """Per-tensor asymmetric uint: x86 onnxruntime runs uint8 activations about 2x faster."""
    return QuantSpec(bits=bits, signed=signed, symmetric=False, per_channel=False)


_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True)
class BitConfig:
    """Default weight and activation bit widths of a model, written `w4a8`."""

    weight: int
    activation: int

    def __post_init__(self) -> None:
        for what, b in (("weight", self.weight), ("activation", self.activation)):
            if not MIN_BITS <= b <= MAX_BITS:
                raise UsageError(
                    f"--bits: {what} bits must be between {MIN_BITS} and {MAX_BITS}, got {b}"
                )

    @classmethod
    def parse(cls, text: str) -> BitConfig:
        """Accept `w4a8`, or a bare `4` meaning 4-bit weights with 8-bit activations."""
        t = text.strip().lower()
        if t.isdigit():
            return cls(weight=int(t), activation=8)
        m = _BITS_RE.match(t)
        if not m:
            raise UsageError(
                f"--bits: '{text}' is not a bit setting; write it as wXaY (e.g. w4a8) or a "
                "single number of weight bits (e.g. 4)"
            )
        return cls(weight=int(m.group(1)), activation=int(m.group(2)))

    def __str__(self) -> str:
        return f"w{self.weight}a{self.activation}"
