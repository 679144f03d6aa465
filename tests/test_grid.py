"""The grid resolver: one pure function decides every quantizer's spec (issue 27 §1.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qcli.models import resnet20
from qcli.quant.capture import apply_plan, capture
from qcli.quant.grid import (
    GraphFacts,
    LayerFacts,
    narrowing_blocker,
    pairs_products,
    resolve_specs,
    stores_unsigned,
)
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import SAFE_INT8_LIMIT, BitConfig, activation_spec, weight_spec

pytestmark = pytest.mark.usefixtures("one_thread")

# conv fed by act_quant.x, depthwise fed by act_quant.conv, fc with a float input
FACTS = GraphFacts(
    layers=(
        LayerFacts("conv", pairs_products=True, input_quantizer="act_quant.x"),
        LayerFacts("dw", pairs_products=False, input_quantizer="act_quant.conv"),
        LayerFacts("fc", pairs_products=True, input_quantizer=None),
    ),
    activations=("act_quant.x", "act_quant.conv"),
)


def _plan(bits: str = "w8a8", **kw) -> QuantPlan:
    return QuantPlan.uniform(BitConfig.parse(bits), **kw)


def test_every_quantizer_gets_its_planned_bits():
    specs = resolve_specs(_plan("w4a8"), FACTS)
    assert set(specs) == {
        "conv.weight_quantizer",
        "dw.weight_quantizer",
        "fc.weight_quantizer",
        "act_quant.x",
        "act_quant.conv",
    }
    assert specs["act_quant.x"] == activation_spec(8)
    assert all(specs[f"{n}.weight_quantizer"] == weight_spec(4) for n in ("conv", "dw", "fc"))
    mixed = _plan("w4a8").with_bits(weights={"fc": 2}, activations={"act_quant.conv": 6})
    specs = resolve_specs(mixed, FACTS)
    assert specs["fc.weight_quantizer"] == weight_spec(2)
    assert specs["act_quant.conv"] == activation_spec(6)


def test_kept_float_layers_get_no_spec():
    specs = resolve_specs(_plan(keep_fp=("conv",)), FACTS)
    assert "conv.weight_quantizer" not in specs and "dw.weight_quantizer" in specs


def test_an_explicit_spec_wins_over_bits_and_narrowing():
    odd = weight_spec(6, limit=20)
    act = activation_spec(5, signed=True)
    plan = QuantPlan(specs={"conv.weight_quantizer": odd, "act_quant.x": act})
    specs = resolve_specs(plan, FACTS)
    assert specs["conv.weight_quantizer"] == odd and specs["act_quant.x"] == act
    # the feeding activation's explicit spec is what decides the next layer's narrowing
    plan = QuantPlan(specs={"act_quant.conv": activation_spec(8)}, act_bits=4)
    wide = LayerFacts("dw", pairs_products=True, input_quantizer="act_quant.conv")
    facts = GraphFacts((wide,), FACTS.activations)
    assert resolve_specs(plan, facts)["dw.weight_quantizer"].limit == SAFE_INT8_LIMIT


def test_narrowing_only_where_the_pair_sum_rule_needs_it():
    specs = resolve_specs(_plan(), FACTS)
    # pairs products, fed by 8-bit activations: ±64
    assert specs["conv.weight_quantizer"] == weight_spec(8, limit=SAFE_INT8_LIMIT)
    # depthwise: one int32 product at a time, full grid
    assert specs["dw.weight_quantizer"] == weight_spec(8)
    # no activation quantizer feeds it: the plan's default activation bits decide (8 here)
    assert specs["fc.weight_quantizer"].limit == SAFE_INT8_LIMIT
    # the feeding activation below 8 bits: 127 · (127 + 127) fits int16, full grid
    low = resolve_specs(_plan().with_bits(activations={"act_quant.x": 7}), FACTS)
    assert low["conv.weight_quantizer"] == weight_spec(8)
    assert low["fc.weight_quantizer"].limit == SAFE_INT8_LIMIT  # its input is still 8-bit
    assert resolve_specs(_plan("w8a4"), FACTS)["fc.weight_quantizer"] == weight_spec(8)
    # the full range, or weights below 8 bits: never narrowed
    full = resolve_specs(_plan(int8_range="full"), FACTS)
    assert all(s.limit is None for s in full.values())
    assert all(s.limit is None for s in resolve_specs(_plan("w7a8"), FACTS).values())


def test_narrowing_blocker_names_the_plan_field_that_rules_widening_out():
    assert narrowing_blocker("safe", 8) is None
    assert narrowing_blocker("safe", None) is None  # widths known only later (bits.json)
    assert narrowing_blocker("full", 8) == "int8_range"
    assert narrowing_blocker("full", 4) == "int8_range"
    assert narrowing_blocker("safe", 4) == "weight_bits"


def test_pairs_products_all_but_depthwise():
    assert pairs_products(nn.Conv2d(8, 8, 3))
    assert pairs_products(nn.Conv2d(8, 16, 3, groups=8))  # grouped, not depthwise
    assert not pairs_products(nn.Conv2d(8, 8, 3, groups=8))
    assert pairs_products(nn.Linear(4, 2))


def test_uint8_storage_where_an_int8_pair_sum_could_saturate():
    wide = np.array([[127, -100, 3]], dtype=np.int8)  # 255 · 227 > 32767
    narrow = np.array([[64, -64, 3]], dtype=np.int8)  # 255 · 128 = 32640 fits
    u8 = activation_spec(8)
    assert stores_unsigned("safe", u8, True, wide)
    assert not stores_unsigned("safe", u8, True, narrow)
    assert not stores_unsigned("full", u8, True, wide)  # the file targets int32 CPUs
    assert not stores_unsigned("safe", u8, False, wide)  # depthwise: no pairs
    assert not stores_unsigned("safe", None, True, wide)  # float input: no u8×s8 kernel
    assert not stores_unsigned("safe", activation_spec(8, signed=True), True, wide)
    assert not stores_unsigned("safe", activation_spec(7), True, wide)  # 127 · 227 fits


def test_capture_builds_exactly_the_resolved_specs():
    torch.manual_seed(0)
    plan = _plan(keep_fp=("linear",)).with_bits(
        weights={"layer1.0.conv1": 4}, activations={"act_quant.x": 6}
    )
    qg = capture(resnet20().eval(), (3, 16, 16), plan)
    specs = resolve_specs(plan, qg.facts)
    assert {n: q.spec for n, q in qg.quantizers()} == specs
    assert "linear.weight_quantizer" not in specs
    assert specs["conv1.weight_quantizer"].limit is None  # fed by the 6-bit input
    assert specs["layer1.0.conv2.weight_quantizer"].limit == SAFE_INT8_LIMIT
    # the facts name, for each layer, the activation quantizer its kernel reads
    layers = dict(qg.layers())
    for f in qg.facts.layers:
        if f.name != "linear":
            iq = layers[f.name].input_quantizer
            assert iq is dict(qg.act_quantizers()).get(f.input_quantizer)


def test_apply_plan_regrids_through_the_resolver_and_reports_what_changed():
    torch.manual_seed(0)
    qg = capture(resnet20().eval(), (3, 16, 16), _plan())
    key = "layer1.0.conv1.weight_quantizer"
    plan = _plan().with_bits(weights={"layer1.0.conv1": 4})
    assert apply_plan(qg, plan) == [key]
    assert dict(qg.quantizers())[key].spec == weight_spec(4)
    assert qg.base_plan == plan
    assert apply_plan(qg, plan) == []
    with pytest.raises(ValueError, match="stay float"):
        apply_plan(qg, _plan(keep_fp=("linear",)))


def test_a_widened_plan_gives_the_chosen_layers_the_full_grid():
    plan = _plan().widened(["conv"])
    assert plan.spec("conv.weight_quantizer") == weight_spec(8)
    specs = resolve_specs(plan, FACTS)
    assert specs["conv.weight_quantizer"] == weight_spec(8)
    assert specs["fc.weight_quantizer"].limit == SAFE_INT8_LIMIT  # the others stay narrowed
    assert QuantPlan.from_json(plan.to_json()) == plan  # the manifest carries it
    # a layer with an exact (reloaded) narrowed spec is widened at its bits
    reloaded = QuantPlan(specs={"fc.weight_quantizer": weight_spec(8, limit=SAFE_INT8_LIMIT)})
    assert reloaded.widened(["fc"]).spec("fc.weight_quantizer") == weight_spec(8)
    assert _plan().widened([]) == _plan()


def test_input_bits_set_the_model_inputs_quantizer_apart():
    facts = GraphFacts(FACTS.layers, FACTS.activations, inputs=("act_quant.x",))
    plan = _plan("w4a4").with_bits(activations={"act_quant.x": 2, "act_quant.conv": 6})
    specs = resolve_specs(QuantPlan(**{**vars(plan), "input_bits": 8}), facts)
    # the input's width wins over act_bits and over a per-quantizer width; the others keep theirs
    assert specs["act_quant.x"] == activation_spec(8)
    assert specs["act_quant.conv"] == activation_spec(6)
    # without input_bits the per-quantizer width holds
    assert resolve_specs(plan, facts)["act_quant.x"] == activation_spec(2)
    # an 8-bit input feeding 8-bit weights that pair products: narrowed like any 8-bit input
    w8 = QuantPlan(8, 4, input_bits=8)
    assert resolve_specs(w8, facts)["conv.weight_quantizer"].limit == SAFE_INT8_LIMIT
    assert resolve_specs(QuantPlan(8, 4), facts)["conv.weight_quantizer"].limit is None


def test_capture_finds_the_input_quantizer_and_a_reload_keeps_its_bits():
    plan = QuantPlan(4, 4, input_bits=8)
    qg = capture(resnet20(), (3, 32, 32), plan)
    assert qg.facts.inputs == ("act_quant.x",)
    bits = {name: q.spec.bits for name, q in qg.act_quantizers()}
    assert bits.pop("act_quant.x") == 8 and set(bits.values()) == {4}
    again = QuantPlan.from_dict(qg.plan.to_dict())
    assert again.input_bits == 8 and again.describe() == "w4a4, input 8-bit"
    reloaded = capture(resnet20(), (3, 32, 32), again)
    assert {n: q.spec for n, q in reloaded.quantizers()} == {n: q.spec for n, q in qg.quantizers()}
