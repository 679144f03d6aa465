"""The quantization plan: one frozen value that says how every quantizer of a model quantizes.

Built from flags (`--bits w4a8 --keep-fp ...`) or from `bits.json` (per-layer choices of
`qcli allocate-bits`), handed once to `capture`, stored in the `.qcli` manifest and read back
from it, so a reload rebuilds exactly what was saved (one source of truth).

Two levels in one value:
- the intent: default weight/activation bits, the model input's bits, per-layer weight bits
  and per-quantizer activation bits (mixed precision), layers kept in float, the int8 range
  policy;
- `specs`: the exact QuantSpec of named quantizers (bits, signedness, symmetry,
  granularity, narrowed grid). A captured graph reports its plan with every quantizer's spec
  filled in (`QuantGraph.plan`), which covers what calibration changed (the int8 range's
  widened layers); capture gives a quantizer named there exactly that spec.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qcli.errors import UsageError
from qcli.quant.spec import INT8_RANGES, MAX_BITS, MIN_BITS, BitConfig, QuantSpec, weight_spec

PLAN_FORMAT = "qcli-quant-plan"
PLAN_VERSION = 2  # 2: input_bits
WEIGHT_SUFFIX = ".weight_quantizer"
_KEYS = {
    "format",
    "version",
    "weight_bits",
    "act_bits",
    "input_bits",
    "signed_activations",
    "int8_range",
    "keep_fp",
    "weights",
    "activations",
    "specs",
}


def _frozen(m: Mapping[str, Any] | tuple) -> tuple:
    """A mapping as a sorted tuple of pairs: hashable, and equal whatever the insertion order."""
    items = m.items() if isinstance(m, Mapping) else m
    return tuple(sorted((str(k), v) for k, v in items))


def _check_bits(where: str, b: Any) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
        raise UsageError(
            f"{where}: bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {b!r}"
        )
    return b


@dataclass(frozen=True)
class QuantPlan:
    """How a model is quantized; see the module docstring."""

    weight_bits: int = 8
    act_bits: int = 8
    signed_activations: bool = False
    int8_range: str = "safe"
    keep_fp: tuple[str, ...] = ()
    weights: tuple[tuple[str, int], ...] = ()  # layer path -> weight bits
    activations: tuple[tuple[str, int], ...] = ()  # activation quantizer -> bits
    specs: tuple[tuple[str, QuantSpec], ...] = field(default=(), repr=False)
    # The quantizers reading the model's inputs (the image the stem convolves): at these bits
    # whatever act_bits and `activations` say (None: like any activation). The papers keep
    # the first layer at 8 bits; an 8-bit image costs an integer kernel nothing.
    input_bits: int | None = None

    def __post_init__(self) -> None:
        _check_bits("weight bits", self.weight_bits)
        _check_bits("activation bits", self.act_bits)
        if self.input_bits is not None:
            _check_bits("input bits", self.input_bits)
        if self.int8_range not in INT8_RANGES:
            raise UsageError(f"int8_range must be one of {INT8_RANGES}, got {self.int8_range!r}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        for name in ("weights", "activations", "specs"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        for layer, b in self.weights:
            _check_bits(f"weights of layer '{layer}'", b)
        for q, b in self.activations:
            _check_bits(f"activation quantizer '{q}'", b)
        kept = set(self.keep_fp) & {k for k, _ in self.weights}
        if kept:
            raise UsageError(f"layer '{sorted(kept)[0]}' is both kept in float and given bits")

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def uniform(
        cls, bits: BitConfig, keep_fp: tuple[str, ...] = (), int8_range: str = "safe"
    ) -> QuantPlan:
        """Every quantizer at the same widths: what `--bits wXaY` means."""
        return cls(bits.weight, bits.activation, keep_fp=tuple(keep_fp), int8_range=int8_range)

    def with_bits(
        self, weights: Mapping[str, int] | None = None, activations: Mapping[str, int] | None = None
    ) -> QuantPlan:
        """This plan with per-layer weight and per-quantizer activation bits (mixed precision)."""
        return replace(
            self,
            weights={**dict(self.weights), **(weights or {})},
            activations={**dict(self.activations), **(activations or {})},
        )

    def widened(self, layers: Iterable[str]) -> QuantPlan:
        """This plan with `layers`' weights on their full grid (no ±64 narrowing): the int8
        range's widening, as exact specs, so capture and the manifest carry it."""
        full = {}
        for layer in layers:
            key = layer + WEIGHT_SUFFIX
            exact = self.spec(key)
            full[key] = weight_spec(exact.bits if exact else self.layer_weight_bits(layer))
        return replace(self, specs={**dict(self.specs), **full})

    # -- lookups --------------------------------------------------------------------------

    @property
    def bits(self) -> BitConfig:
        """The default widths (mixed-precision layers may differ)."""
        return BitConfig(self.weight_bits, self.act_bits)

    @property
    def mixed(self) -> bool:
        return bool(self.weights or self.activations)

    def layer_weight_bits(self, layer: str) -> int:
        return dict(self.weights).get(layer, self.weight_bits)

    def act_quantizer_bits(self, name: str, reads_input: bool = False) -> int:
        """The bits of an activation quantizer; `reads_input`: it quantizes a model input."""
        if reads_input and self.input_bits is not None:
            return self.input_bits
        return dict(self.activations).get(name, self.act_bits)

    def spec(self, quantizer: str) -> QuantSpec | None:
        """The exact spec fixed for a quantizer, if any (`layer.weight_quantizer` for weights)."""
        return dict(self.specs).get(quantizer)

    def describe(self) -> str:
        """`w4a8`, or `mixed (default w4a8)` when layers differ; `, input 8-bit` when the
        model input's width is set apart."""
        text = f"mixed (default {self.bits})" if self.mixed else str(self.bits)
        return text if self.input_bits is None else f"{text}, input {self.input_bits}-bit"

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "input_bits": self.input_bits,
            "signed_activations": self.signed_activations,
            "int8_range": self.int8_range,
            "keep_fp": list(self.keep_fp),
            "weights": dict(self.weights),
            "activations": dict(self.activations),
            "specs": {k: s.to_dict() for k, s in self.specs},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> QuantPlan:
        """Validate and build; every error names the bad key, layer or quantizer."""
        if not isinstance(d, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key '{unknown[0]}' (known: {sorted(_KEYS)})")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise UsageError(f"{where}: format is {d.get('format')!r}, not {PLAN_FORMAT!r}")
        if d.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise UsageError(f"{where}: version {d['version']} is newer than this qcli reads")
        for key in ("weights", "activations", "specs"):
            if not isinstance(d.get(key, {}), dict):
                raise UsageError(f"{where}: '{key}' must map names to values")
        if not isinstance(d.get("keep_fp", []), list):
            raise UsageError(f"{where}: 'keep_fp' must be a list of layer names")
        specs = {}
        for name, s in d.get("specs", {}).items():
            try:
                specs[name] = QuantSpec.from_dict(s)
            except (KeyError, TypeError, ValueError, UsageError) as e:
                raise UsageError(f"{where}: quantizer '{name}' has a malformed spec ({e})") from e
        signed = d.get("signed_activations", False)
        if not isinstance(signed, bool):
            raise UsageError(f"{where}: 'signed_activations' must be true or false")
        return cls(
            weight_bits=_check_bits(f"{where}: weight_bits", d.get("weight_bits", 8)),
            act_bits=_check_bits(f"{where}: act_bits", d.get("act_bits", 8)),
            input_bits=None
            if d.get("input_bits") is None
            else _check_bits(f"{where}: input_bits", d["input_bits"]),
            signed_activations=signed,
            int8_range=d.get("int8_range", "safe"),
            keep_fp=tuple(d.get("keep_fp", [])),
            weights={k: _check_bits(f"{where}: layer '{k}'", v) for k, v in d["weights"].items()}
            if "weights" in d
            else {},
            activations={
                k: _check_bits(f"{where}: activation quantizer '{k}'", v)
                for k, v in d.get("activations", {}).items()
            },
            specs=specs,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> QuantPlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} is not valid JSON ({e})") from e
        return cls.from_dict(d, where)
