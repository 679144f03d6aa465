"""Where a layer's grid is decided: the plan, the graph and the target's constraints in, specs out.

`resolve_specs` is the one function that says which `QuantSpec` every quantizer of a graph
gets; `capture` builds quantizers with its answer, `apply_plan` re-applies a new plan (the
int8 range's widened layers) through it. The same module holds the two target rules that
shape a grid after the plan has spoken:

- onnxruntime's u8×s8 kernels on x86 without VNNI add adjacent products in saturating int16
  pairs (see `export.kernels`). Under `int8_range="safe"` an 8-bit weight grid of a layer
  that pairs products, fed by 8-bit activations, is narrowed to ±SAFE_INT8_LIMIT;
- a layer whose int8 weights could still saturate a pair sum (a widened one) is stored as
  uint8 weights with zero point U8_ZP (u8×u8 kernels never saturate): `stores_unsigned`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from qcli.quant.plan import WEIGHT_SUFFIX, QuantPlan
from qcli.quant.spec import SAFE_INT8_LIMIT, QuantSpec, activation_spec, weight_spec

INT16_MAX = 32767
U8_MAX = 255
U8_ZP = 128  # uint8 weights: the int8 integers shifted up, so u8×u8 kernels run them


@dataclass(frozen=True)
class LayerFacts:
    """What a conv/linear layer's weight grid depends on in the graph."""

    name: str  # module path; its weight quantizer is `name + WEIGHT_SUFFIX`
    pairs_products: bool  # its u8×s8 kernel adds products in int16 pairs (`pairs_products`)
    input_quantizer: str | None = None  # the activation quantizer feeding it (None: float)


@dataclass(frozen=True)
class GraphFacts:
    """The graph as the resolver sees it: its conv/linear layers and activation quantizers."""

    layers: tuple[LayerFacts, ...]  # execution order
    activations: tuple[str, ...]
    inputs: tuple[str, ...] = ()  # the activation quantizers of the model's inputs


def pairs_products(m: nn.Module) -> bool:
    """Whether onnxruntime's u8×s8 kernel for this layer adds products in int16 pairs.

    Every conv and linear does, except depthwise convs (one input and one output channel per
    group), which onnxruntime runs through a kernel that accumulates each product in int32.
    """
    if isinstance(m, nn.Conv2d):
        return not (m.in_channels == m.groups == m.out_channels and m.groups > 1)
    return isinstance(m, nn.Linear)


def narrows(int8_range: str, weight_bits: int, act_bits: int, pairs: bool) -> bool:
    """Whether a weight grid is narrowed to ±SAFE_INT8_LIMIT: 8-bit weights fed by 8-bit
    activations that onnxruntime pairs in int16, under 'safe' (below 8 activation bits the
    uint8 codes stay under 128, and 127 · (127 + 127) already fits int16)."""
    return narrowing_blocker(int8_range, weight_bits) is None and act_bits == 8 and pairs


def narrowing_blocker(int8_range: str, weight_bits: int | None) -> str | None:
    """The plan field that rules out every narrowed grid (so there is nothing to widen):
    'int8_range' or 'weight_bits'; None where some layer may be narrowed (`weight_bits`
    None: not known yet)."""
    if int8_range != "safe":
        return "int8_range"
    if weight_bits is not None and weight_bits != 8:
        return "weight_bits"
    return None


def resolve_specs(plan: QuantPlan, facts: GraphFacts) -> dict[str, QuantSpec]:
    """Every quantizer's spec, by quantizer name: none for layers kept in float; the plan's
    exact spec where it names one (a reloaded .qcli, a widened layer); else activations at
    their planned bits (the model inputs' at `input_bits`) and weights at theirs, on the grid
    `narrows` allows for the activation feeding the layer."""
    signed = plan.signed_activations
    specs = {
        name: plan.spec(name)
        or activation_spec(plan.act_quantizer_bits(name, name in facts.inputs), signed)
        for name in facts.activations
    }
    for layer in facts.layers:
        if layer.name in plan.keep_fp:
            continue
        key = layer.name + WEIGHT_SUFFIX
        exact = plan.spec(key)
        if exact is not None:
            specs[key] = exact
            continue
        bits = plan.layer_weight_bits(layer.name)
        iq = layer.input_quantizer
        act_bits = specs[iq].bits if iq is not None else plan.act_bits
        narrow = narrows(plan.int8_range, bits, act_bits, layer.pairs_products)
        specs[key] = weight_spec(bits, limit=SAFE_INT8_LIMIT if narrow else None)
    return specs


def max_pair_sum(weight_ints: np.ndarray, act_max: int = U8_MAX) -> int:
    """Worst int16 pair sum of a u8×s8 layer: a_max · (two largest |w| of a channel)."""
    w = np.abs(weight_ints.astype(np.int64).reshape(weight_ints.shape[0], -1))
    if w.shape[1] == 1:
        top2 = w[:, 0]
    else:
        part = -np.partition(-w, 1, axis=1)
        top2 = part[:, 0] + part[:, 1]
    return int(act_max * top2.max()) if top2.size else 0


def stores_unsigned(
    int8_range: str, input_spec: QuantSpec | None, pairs: bool, weight_ints: np.ndarray
) -> bool:
    """Whether a layer's int8 weights go to the file as uint8 (zero point U8_ZP): when its
    u8×s8 kernel could saturate an int16 pair sum on a CPU without VNNI (a widened grid).
    It depends on the weights' integers, so the exporter asks it once they are final."""
    if int8_range == "full" or input_spec is None or input_spec.signed or not pairs:
        return False
    return max_pair_sum(weight_ints, input_spec.qmax) > INT16_MAX
