"""MRECG: the merge rule (capacities, gaps, top-k, protected ends, triples), the oscillation
metric, and the command line end to end through export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qcli.methods import mrecg, recipes
from qcli.methods import reconstruction as R
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from test_cli import calibrate_r20, run

# ------------------------------------------------------------------------- pure functions


def test_modcap_discounts_stride_and_counts_bits():
    terms = [mrecg.LayerTerm(100, 1, 4), mrecg.LayerTerm(200, 2, 4), mrecg.LayerTerm(10, 1, 32)]
    assert mrecg.modcap(terms) == 100 * 4 + 0.5 * 200 * 4 + 10 * 32
    assert mrecg.modcap(terms, alpha=0.25) == 100 * 4 + 0.25 * 200 * 4 + 10 * 32


def test_gaps_follow_their_definitions():
    assert mrecg.capacity_gaps([5.0, 3.0, 4.0]) == [2.0, -1.0]  # ModCap_i - ModCap_{i+1}
    assert mrecg.loss_gaps([1.0, 3.0, 2.0]) == [2.0, -1.0]  # L_{i+1} - L_i


def test_top_k_gaps_are_merged():
    gaps = [0.0, 5.0, 1.0, 4.0, 0.5, 3.0, 0.0]  # 8 units
    assert mrecg.choose_merges(gaps, 1) == [(1, 2)]
    assert mrecg.choose_merges(gaps, 2) == [(1, 2), (3, 4)]
    assert mrecg.choose_merges(gaps, 3) == [(1, 2), (3, 4), (5, 6)]
    assert mrecg.choose_merges(gaps, 0) == []


def test_stem_and_classifier_are_never_merged():
    gaps = [9.0, 1.0, 2.0, 8.0]  # 5 units; the largest gaps touch unit 0 and unit 4
    protected = mrecg.protected_units(5)
    assert protected == {0, 4}
    assert mrecg.choose_merges(gaps, 1, protected) == [(2, 3)]
    assert mrecg.choose_merges(gaps, 2, protected) == [(1, 2, 3)]
    # asking for more merges than the free pairs allow takes what is allowed
    assert mrecg.choose_merges(gaps, 5, protected) == [(1, 2, 3)]


def test_overlapping_picks_chain_into_triples_never_longer():
    gaps = [0.0, 9.0, 8.0, 7.0, 0.0, 0.0]  # pairs 1-2, 2-3, 3-4 are the top three
    assert mrecg.choose_merges(gaps, 2) == [(1, 2, 3)]
    # 3-4 would make 1-2-3-4 and 0-1 would make 0-1-2-3: both skipped, 4-5 is next
    assert mrecg.choose_merges(gaps, 3) == [(1, 2, 3), (4, 5)]


def test_ties_go_to_the_shallower_pair():
    assert mrecg.choose_merges([0.0, 0.0, 0.0, 0.0, 0.0], 1, frozenset({0, 5})) == [(1, 2)]


def test_default_merges_are_a_fifth_of_the_units():
    assert mrecg.default_merges(11) == 2  # ResNet-20: stem, 9 blocks, classifier
    assert mrecg.default_merges(19) == 4  # EfficientNet-Lite0
    assert mrecg.default_merges(3) == 1


def test_oscillation_of_a_made_up_profile():
    assert mrecg.oscillation([1.0, 2.0, 3.0, 3.0]) == {
        "decreases": 0,
        "total_decrease": 0.0,
        "relative": 0.0,
    }
    osc = mrecg.oscillation([1.0, 4.0, 2.0, 5.0, 3.0, 8.0])
    assert osc["decreases"] == 2
    assert osc["total_decrease"] == pytest.approx(2.0 + 2.0)
    assert osc["relative"] == pytest.approx(4.0 / 8.0)


def test_merged_units_sit_at_their_last_block_on_the_depth_axis():
    d = mrecg.decide("loss", [f"u{i}" for i in range(6)], [1, 5, 2, 6, 7, 9], merges=1)
    assert d.groups == ((2, 3),)  # the largest loss jump, 2 -> 6, is inside the free units
    assert mrecg.depths(d, 5) == [0, 1, 3, 4, 5]
    assert d.merged() == [{"units": ["u2", "u3"], "gaps": [4.0]}]


# ---------------------------------------------------------------- a network of known sizes


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _Net(nn.Module):
    """Block capacities at 4-bit weights (9·cin·cout·4, halved for the stride-2 block):
    2304, 2304, 18432, 4608, 576, 2304."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.blocks = nn.Sequential(
            _Block(8, 8), _Block(8, 16, 2), _Block(16, 32), _Block(32, 4), _Block(4, 4)
        )
        self.blocks.append(_Block(4, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def net_graph():
    torch.manual_seed(0)
    return capture(_Net().eval(), (3, 16, 16), QuantPlan.uniform(BitConfig(4, 8)))


def test_data_free_decision_on_known_capacities(net_graph):
    plan, d = mrecg.data_free_decision(net_graph, merges=1)
    assert d.values[1:7] == (2304.0, 2304.0, 18432.0, 4608.0, 576.0, 2304.0)
    # the largest gap: 18432 -> 4608 between blocks.2 and blocks.3 (units 3 and 4)
    assert d.groups == ((3, 4),)
    assert [u["unit"] for u in R.describe_units(net_graph, plan)][3] == (
        "blocks.2.conv+blocks.3.conv"
    )
    # the next gap, 4608 -> 576, overlaps: the two chain into a triple
    plan, d = mrecg.data_free_decision(net_graph, merges=2)
    assert d.groups == ((3, 4, 5),)
    assert len(R.describe_units(net_graph, plan)) == 8 - 2


def test_merged_plan_reconstructs(net_graph):
    import copy

    qg = copy.deepcopy(net_graph)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    r = recipes.prepare("brecq", {"granularity": "mrecg", "capacity": "data-free", "iters": 2})
    s = r.engine
    R.init_ranges(qg, x, s)
    choice = mrecg.choose_plan(qg, s, r.mrecg, None)
    results = R.reconstruct(qg, x, s, plan=choice.plan)
    assert [r.name for r in results][3] == "blocks.2.conv+blocks.3.conv+blocks.4.conv"
    report = mrecg.oscillation_report(qg, choice, results)
    assert report["profiles"]["reconstructed"]["depth"] == [0, 1, 2, 5, 6, 7]
    assert len(report["axis"]) == 8


def test_loss_capacity_needs_images(net_graph):
    r = recipes.prepare("qdrop", {"granularity": "mrecg"})
    with pytest.raises(R.UsageError, match="--capacity data-free"):
        mrecg.choose_plan(net_graph, r.engine, r.mrecg, None)


@pytest.mark.parametrize(
    ("method", "overrides", "message"),
    [
        ("adaround", {"granularity": "mrecg"}, "applies to brecq and qdrop"),
        ("qdrop", {"merges": 2}, "--merges applies to --granularity mrecg only"),
        ("brecq", {"capacity": "loss"}, "--capacity applies"),
        ("qdrop", {"granularity": "mrecg", "capacity_alpha": 0.3}, "--capacity data-free only"),
        (
            "qdrop",
            {"granularity": "mrecg", "capacity": "data-free", "capacity_iters": 5},
            "--capacity loss only",
        ),
    ],
)
def test_settings_that_do_not_apply_are_refused(method, overrides, message):
    with pytest.raises(R.UsageError, match=message):
        recipes.settings_for(method, overrides)


# ----------------------------------------------------------------------------- the CLI


def test_mrecg_calibrates_plots_and_exports(tmp_path: Path, weights: Path, images: Path):
    out, png = tmp_path / "m.qcli", tmp_path / "loss.png"
    code, stdout, err = calibrate_r20(
        weights,
        images,
        *("--bits", "w4a8", "--method", "qdrop", "--granularity", "mrecg", "--iters", "3"),
        *("--capacity-iters", "2", "--merges", "2", "--recon-batch", "8", "--bn-tune"),
        *("--plot", png, "--out", out, "--json"),
    )
    assert code == 0, err
    result = json.loads(stdout)
    recon = json.loads((out / "manifest.json").read_text())["metrics"]["reconstruction"]
    d = recon["mrecg"]
    assert d["capacity"] == "loss" and d["merges"] == 2 and d["capacity_iters"] == 2
    assert sum(len(g) - 1 for g in d["groups"]) == 2
    merged = {i for g in d["groups"] for i in g}
    assert 0 not in merged and len(d["units"]) - 1 not in merged
    assert len(recon["units"]) == len(d["units"]) - 2
    assert recon["settings"]["batch_size"] == 8
    profiles = recon["oscillation"]["profiles"]
    assert {"reconstructed", "before reconstruction", "block base pass (2 iters/unit)"} <= set(
        profiles
    )
    assert "relative" in profiles["reconstructed"]["oscillation"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["reconstruction"]["mrecg"]["groups"] == d["groups"]
    code, _, err = run("export", out, "--out", tmp_path / "m.onnx")  # onnxruntime check
    assert code == 0, err


def test_show_units_with_data_free_capacity_needs_no_data(weights: Path):
    code, stdout, err = run(
        *("calibrate", "builtin:resnet20_cifar10", "--weights", weights, "--method", "brecq"),
        *("--granularity", "mrecg", "--capacity", "data-free", "--show-units", "--json"),
    )
    assert code == 0, err
    r = json.loads(stdout)
    assert r["granularity"] == "mrecg" and r["mrecg"]["capacity"] == "data-free"
    assert len(r["units"]) == 11 - r["mrecg"]["merges"]
    assert r["mrecg"]["values"][1] == 2 * 16 * 16 * 9 * 8  # layer1.0: two 16x16 3x3 convs, w8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "qdrop", "--granularity", "mrecg", "--show-units"), "give --data"),
        (("--method", "adaround", "--granularity", "mrecg", "--show-units"), "brecq and qdrop"),
        (("--method", "qdrop", "--merges", "2", "--show-units"), "--granularity mrecg only"),
        (("--method", "mse", "--plot", "x.png", "--data", ".", "--out", "n.qcli"), "--plot"),
    ],
)
def test_mrecg_usage_errors(weights: Path, args, message):
    code, _, err = run("calibrate", "builtin:resnet20_cifar10", "--weights", weights, *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_quantize_refuses_mrecg_for_a_layer_method_before_any_work(weights: Path, tmp_path: Path):
    code, _, err = run(
        *("quantize", "builtin:resnet20_cifar10", "--weights", weights, "--bits", "w4a4"),
        *("--method", "adaround", "--granularity", "mrecg", "--out", tmp_path / "q"),
    )
    assert code == 2 and "brecq and qdrop" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.usefixtures("one_thread")
def test_quantize_passes_the_granularity_on(weights: Path, images: Path, tmp_path: Path):
    """`quantize --granularity mrecg` reconstructs MRECG's merged units: the written
    manifest holds its decision and the units follow it (not only the settings dict)."""
    from qcli.stages.quantize import QuantizeConfig, method_settings

    cfg = QuantizeConfig(None, Path("q"), BitConfig(4, 4), granularity="mrecg")  # type: ignore[arg-type]
    assert method_settings("qdrop", cfg)["granularity"] == "mrecg"
    out = tmp_path / "q"
    code, _, err = run(
        *("quantize", "builtin:resnet20_cifar10", "--weights", weights, "--data", images),
        *("--bits", "w4a8", "--method", "qdrop", "--granularity", "mrecg", "--iters", "2"),
        *("--no-latency", "--out", out),
    )
    assert code == 0, err
    manifest = json.loads((out / "model.qcli" / "manifest.json").read_text())
    recon = manifest["metrics"]["reconstruction"]
    assert recon["settings"]["granularity"] == "mrecg"
    d = recon["mrecg"]
    merged = sum(len(g) - 1 for g in d["groups"])
    assert d["capacity"] == "loss" and merged == d["merges"] >= 1
    assert len(recon["units"]) == len(d["units"]) - merged
