"""MetaAug: the transformation network, its loss terms, the bi-level step, and the CLI.

Toy problems on a randomly initialised ResNet-20 at 16x16 keep it fast; the CLI test checks
that a MetaAug result survives .qcli -> ONNX -> onnxruntime like every method.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import resource
from pathlib import Path

import pytest
import torch

from qcli.errors import UsageError
from qcli.methods import metaaug as M
from qcli.methods import recipes
from qcli.methods import reconstruction as R
from qcli.methods.chain import Chain, unit_plan
from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.methods.registry import CALIBRATION_METHODS
from qcli.models.resnet_cifar import resnet20
from qcli.quant.capture import capture
from qcli.quant.partition import unit_module
from qcli.quant.plan import QuantPlan
from qcli.quant.quantizer import composed
from qcli.quant.spec import BitConfig
from test_cli import calibrate_r20, run

pytestmark = pytest.mark.usefixtures("one_thread")

NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # pixels 0..1 -> -2..2


def _graph(seed: int = 0):
    torch.manual_seed(seed)  # the model's random init only
    qg = capture(resnet20().eval(), (3, 16, 16), QuantPlan.uniform(BitConfig(3, 4)))
    x = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 4 - 2
    set_weight_ranges(qg, "mse")
    set_activation_ranges(qg, x.split(16), "mse")
    for p in qg.module.parameters():
        p.requires_grad_(False)
    return qg, x


def _settings(method: str = "brecq") -> R.ReconSettings:
    settings = {"iters": 6, "batch_size": 16, "seed": 5, "eval_images": 48}
    return recipes.settings_for(method, settings)


def _meta(qg, x, **kw) -> M.MetaAug:
    m = M.meta_settings({"metaaug": True, "seed": 5, **kw})
    assert m is not None
    return M.MetaAug(qg, x, _settings(), m, M.pixel_range(NORM))


def _second_block(qg, x):
    """The chain past the stem, and the first residual block's step."""
    chain = Chain.start(qg, x, 16, torch.float32)
    plan = unit_plan(qg, "block")
    chain.advance(plan[0].segment)
    step = next(s for s in plan[1:] if s.units)
    return chain, step.segment, step.units[0]


def test_transform_starts_near_the_identity_within_the_pixel_range():
    bounds = M.pixel_range(NORM)
    net = M.transform_net(bounds, M.MetaAugSettings())
    x = torch.rand(4, 3, 17, 15) * 4 - 2  # odd sizes: the decoder pads to the skips
    y = net(x)
    assert y.shape == x.shape
    assert 0 < (y - x).pow(2).mean() < 1e-4
    assert y.min() >= -2 and y.max() <= 2
    again = M.transform_net(bounds, M.MetaAugSettings())
    assert torch.equal(again(x), y)  # seeded: no global RNG


def test_transform_cannot_collapse_to_the_identity():
    qg, x = _graph()
    meta = _meta(qg, x, meta_iters=25, meta_lr=3e-3)
    chain, seg, unit = _second_block(qg, x)
    before = (meta.transform(x) - x).pow(2).mean()
    report = meta.train(chain, seg, unit)
    after = (meta.transform(x) - x).pow(2).mean()
    assert not torch.allclose(meta.transform(x), x, atol=1e-3)  # T(x) != x
    assert after > 100 * before
    assert report.change > 0 and report.steps == 25
    # the unit's own tensors are untouched and carry no rounding or gradient
    module = unit_module(qg, unit)
    assert all(not p.requires_grad for p in module.parameters())
    assert all(getattr(q, "rounding", None) is None for q in module.modules())


def test_zero_meta_steps_is_the_base_method():
    results = []
    for settings in ({}, {"metaaug": True, "meta_iters": 0}):
        qg, x = _graph()
        given = {"iters": 6, "batch_size": 16, **settings}
        out = CALIBRATION_METHODS["qdrop"].run(qg, x.split(16), given)
        params = torch.cat([p.detach().flatten() for p in qg.module.parameters()])
        results.append(([u["loss_after"] for u in out["reconstruction"]["units"]], params))
    (losses_a, params_a), (losses_b, params_b) = results
    assert losses_a == losses_b
    assert torch.equal(params_a, params_b)


def test_kl_and_pkt_by_hand():
    fp = torch.tensor([[4.0, 0.0]])
    q = torch.tensor([[0.0, 0.0]])
    p = torch.softmax(fp / 4, dim=1)
    expected = float((p * (p / 0.5).log()).sum())
    assert float(M.kl_term(fp, q, 4.0)) == pytest.approx(expected, rel=1e-6)
    assert float(M.kl_term(fp, fp)) == pytest.approx(0.0, abs=1e-7)
    # orthogonal pair vs identical pair: similarities (0+1)/2 and (1+1)/2
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    pt = torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]])
    ps = torch.full((2, 2), 0.5)
    expected = float((pt * (pt / ps).log()).mean())
    assert float(M.pkt_term(student, teacher)) == pytest.approx(expected, rel=1e-4)
    assert float(M.pkt_term(teacher * 3, teacher)) == pytest.approx(0.0, abs=1e-6)
    x = torch.zeros(2, 3)
    assert float(M.margin_term(x + 0.2, x, 0.1)) == pytest.approx(0.06)
    assert float(M.margin_term(x + 1.0, x, 0.1)) == 0.0


def test_the_inner_step_is_differentiable_in_T():
    qg, x = _graph()
    meta = _meta(qg, x, meta_iters=1)
    chain, seg, unit = _second_block(qg, x)
    meta._targets(chain.fp)
    module = unit_module(qg, unit)
    layers, acts = R.unit_parts(module)
    groups, _ = R.learnables(layers, acts, meta.s)
    names = {id(p): n for n, p in module.named_parameters()}
    params = {names[id(p)]: p.requires_grad_(True) for g in groups for p in g["params"]}
    eta = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    step = M._MetaStep(meta, chain, seg, unit, module, params, eta)
    with composed(qg.select()):
        new = step.inner(meta.net(x[:16]))
        kl = M.kl_term(meta.fp_logits[16:32], M.functional_call(qg.module, new, (x[16:32],)))
        grads = torch.autograd.grad(kl, list(meta.net.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert any(not torch.equal(new[k], p) for k, p in params.items())


def test_meta_settings_are_checked():
    assert M.meta_settings({}) is None
    with pytest.raises(UsageError, match="--meta-iters needs --metaaug"):
        M.meta_settings({"meta_iters": 3})
    with pytest.raises(UsageError, match="three numbers"):
        M.meta_settings({"metaaug": True, "meta_weights": "1,2"})
    m = M.meta_settings({"metaaug": True, "meta_weights": "1,0,2.5", "meta_margin": 0.2})
    assert m is not None and m.weights == (1.0, 0.0, 2.5) and m.margin == 0.2
    assert math.isclose(M.parse_weights("5,0.5,3e4")[2], 3e4)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def test_metaaug_round_trips_through_onnxruntime(tmp_path: Path, weights: Path, images: Path):
    out = tmp_path / "meta.qcli"
    rss_before = _peak_rss_mib()
    code, stdout, err = calibrate_r20(
        weights,
        images,
        "--bits",
        "w4a8",
        "--method",
        "qdrop",
        "--iters",
        "3",
        "--metaaug",
        "--meta-iters",
        "2",
        "--bn-tune",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    result = json.loads(stdout)
    meta = json.loads((out / "manifest.json").read_text())["metrics"]["metaaug"]
    assert result["metaaug"]["seconds"] == meta["seconds"]
    assert meta["units"] and all(u["steps"] == 2 for u in meta["units"])
    # peak RSS in MiB of this very process, measured around the run: within what the test
    # reads before and after it, and never falling from one unit to the next
    lo, hi = rss_before - 0.1, _peak_rss_mib() + 0.1
    peaks = [meta["peak_rss_mb_before"], *(u["peak_rss_mb"] for u in meta["units"])]
    assert lo <= peaks[0] and all(a <= b + 0.1 for a, b in itertools.pairwise(peaks))
    assert peaks[-1] <= meta["peak_rss_mb"] + 0.1 and meta["peak_rss_mb"] <= hi
    code, _, err = run("export", out, "--out", tmp_path / "meta.onnx")
    assert code == 0, err


@pytest.mark.parametrize(
    "args, message",
    [
        (("--method", "adaround", "--metaaug"), "--metaaug does not apply to --method adaround"),
        (("--method", "qdrop", "--meta-iters", "3"), "--meta-iters needs --metaaug"),
        (("--method", "brecq", "--metaaug", "--meta-weights", "1,x,2"), "three numbers"),
    ],
)
def test_metaaug_usage_errors(tmp_path: Path, weights: Path, images: Path, args, message):
    code, _, err = calibrate_r20(weights, images, *args, "--out", tmp_path / "x.qcli")
    assert code == 2
    assert message in err


def test_adaquant_layers_get_a_meta_phase_but_not_the_stem_or_classifier():
    qg, x = _graph()
    settings = {"iters": 2, "batch_size": 16, "metaaug": True, "meta_iters": 1, "input_norm": NORM}
    out = CALIBRATION_METHODS["adaquant"].run(qg, x.split(16), settings)
    names = [u["name"] for u in out["reconstruction"]["units"]]
    meta = [u["name"] for u in out["metaaug"]["units"]]
    assert meta == names[1:-1]  # every layer but the first conv and the classifier
    assert out["metaaug"]["settings"]["iters"] == 1


def test_quantize_passes_metaaug_on(tmp_path: Path, weights: Path, images: Path, monkeypatch):
    """`quantize --metaaug` runs MetaAug's meta phase: the written manifest reports it for
    every unit it trains (not only the settings dict)."""
    from qcli.stages.common import ModelOptions
    from qcli.stages.quantize import QuantizeConfig, method_settings

    cfg = QuantizeConfig(ModelOptions("builtin:resnet20_cifar10"), tmp_path / "q", metaaug=True)
    assert method_settings("qdrop", cfg)["metaaug"] is True
    # quantize has no --meta-iters: two meta steps per unit instead of 50 keep this fast
    monkeypatch.setattr(M, "MetaAugSettings", functools.partial(M.MetaAugSettings, iters=2))
    out = tmp_path / "meta"
    code, _, err = run(
        "quantize", "builtin:resnet20_cifar10", "--weights", weights, "--data", images,
        "--bits", "w4a8", "--method", "qdrop", "--iters", "2", "--metaaug", "--no-latency",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "model.qcli" / "manifest.json").read_text())
    meta = manifest["metrics"]["metaaug"]
    assert meta["settings"]["iters"] == 2
    recon = [u["name"] for u in manifest["metrics"]["reconstruction"]["units"]]
    assert [u["name"] for u in meta["units"]] == recon[1:-1]  # all but stem and classifier
    assert all(u["steps"] == 2 and u["change"] > 0 for u in meta["units"])
    code, _, err = run(
        "quantize", "builtin:resnet20_cifar10", "--weights", weights, "--data", images,
        "--method", "mse", "--metaaug", "--out", tmp_path / "q",
    )  # fmt: skip
    assert code == 2 and "--metaaug does not apply to --method mse" in err
