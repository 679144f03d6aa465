"""Units for reconstruction: single-input spans that never split a residual block."""

from __future__ import annotations

import itertools

import pytest
import timm

from qcli.models import resnet20
from qcli.quant.capture import capture
from qcli.quant.partition import partition
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig


@pytest.fixture(scope="module")
def r20():
    return capture(resnet20().eval(), (3, 32, 32), QuantPlan.uniform(BitConfig(8, 8)))


@pytest.mark.parametrize("granularity", ["layer", "block", "stage"])
def test_every_layer_in_exactly_one_unit(r20, granularity):
    units = partition(r20, granularity)
    layers = [name for u in units for name in u.layers]
    assert layers == [name for name, _ in r20.layers()]
    nodes = [n for u in units for n in u.nodes]
    assert len(nodes) == len(set(nodes))


def test_resnet20_blocks_and_stages(r20):
    blocks = partition(r20, "block")
    assert [u.name for u in blocks] == ["conv1"] + [
        f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)
    ] + ["linear"]
    assert all(len(u.layers) == 2 for u in blocks[1:-1])
    stages = partition(r20, "stage")
    assert [u.name for u in stages] == ["conv1", "layer1", "layer2", "layer3", "linear"]


def test_units_have_one_input_from_the_previous_unit(r20):
    units = partition(r20, "block")
    for prev, unit in itertools.pairwise(units):
        assert unit.input == prev.output


def test_inverted_residuals_are_blocks():
    qg = capture(
        timm.create_model("tf_efficientnet_lite0").eval(),
        (3, 64, 64),
        QuantPlan.uniform(BitConfig(8, 8)),
    )
    names = [u.name for u in partition(qg, "block")]
    assert "blocks.1.0" in names and "blocks.1.1" in names
    assert len(partition(qg, "layer")) > len(names) > len(partition(qg, "stage"))
