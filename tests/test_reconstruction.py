"""Reconstruction PTQ (AdaRound, AdaQuant, BRECQ, QDrop) and BN/bias tuning.

Toy layers check the mechanics with hand-checkable properties; the CLI tests check that every
method's result survives .qcli -> ONNX -> onnxruntime with the simulation check.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from qcli.methods import recipes
from qcli.methods import reconstruction as R
from qcli.methods.chain import float_twin, unit_plan
from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.methods.registry import CALIBRATION_METHODS
from qcli.methods.tuning import ChannelStats, tune_statistics
from qcli.quant.capture import capture
from qcli.quant.modules import QConv2d
from qcli.quant.partition import unit_module
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from test_cli import calibrate_r20, run


def _toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _calibrated(bits: BitConfig, seed: int = 0):
    qg = capture(_toy(seed), (3, 8, 8), QuantPlan.uniform(bits))
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    set_weight_ranges(qg, "mse")
    set_activation_ranges(qg, x.split(16), "mse")
    for p in qg.module.parameters():
        p.requires_grad_(False)
    return qg, x


def _second_unit(qg, x: torch.Tensor):
    """The second conv's unit (8 -> 8 channels), its cached input and float target."""
    from qcli.methods.chain import Chain

    chain = Chain.start(qg, x, 16, torch.float32)
    plan = unit_plan(qg, "layer")
    chain.advance(plan[0].segment)
    seg, (unit,) = plan[1].segment, plan[1].units
    float_inputs = chain.inputs(seg, unit, quantized=False)
    return unit_module(qg, unit), chain.inputs(seg, unit), chain.targets(unit, float_inputs)


def test_adaround_ends_binary_and_in_range():
    qg, x = _calibrated(BitConfig(3, 8))
    module, xq, y = _second_unit(qg, x)
    conv = next(m for m in module.modules() if isinstance(m, QConv2d))
    w0 = conv.weight.detach().clone()
    wq = conv.weight_quantizer
    s = recipes.settings_for("adaround", {"iters": 60, "batch_size": 16})
    R.reconstruct_unit(module, xq, None, y, s, torch.Generator().manual_seed(0))
    assert wq.rounding is None  # baked into the weights
    scale = wq.scale.reshape(-1, 1, 1, 1)
    grid = conv.weight / scale
    assert torch.allclose(grid, grid.round(), atol=1e-4)  # weights sit on the grid
    k = grid.round()
    assert k.min() >= wq.spec.qmin and k.max() <= wq.spec.qmax
    down = torch.floor(w0 / scale).clamp(wq.spec.qmin, wq.spec.qmax)
    up = (torch.floor(w0 / scale) + 1).clamp(wq.spec.qmin, wq.spec.qmax)
    assert bool(((k == down) | (k == up)).all())  # one of the two nearest grid points


@pytest.mark.parametrize("method", ["adaround", "adaquant", "brecq"])
def test_reconstruction_lowers_the_unit_loss(method: str):
    qg, x = _calibrated(BitConfig(2, 8))
    module, xq, y = _second_unit(qg, x)
    s = recipes.settings_for(method, {"iters": 200, "batch_size": 16})
    before, after, _ = R.reconstruct_unit(module, xq, None, y, s, torch.Generator().manual_seed(0))
    assert after < 0.9 * before, (before, after)


def _run_method(method: str, settings: dict) -> dict[str, torch.Tensor]:
    qg, x = _calibrated(BitConfig(4, 4), seed=1)
    run_fn = CALIBRATION_METHODS[method].run
    run_fn(qg, x.split(16), {"iters": 20, "batch_size": 16, **settings})
    return {k: v.clone() for k, v in qg.module.state_dict().items()}


def test_qdrop_with_drop_probability_zero_is_brecq():
    brecq = _run_method("brecq", {})
    qdrop0 = _run_method("qdrop", {"drop_prob": 0.0})
    qdrop = _run_method("qdrop", {})
    assert brecq.keys() == qdrop0.keys()
    assert all(torch.equal(brecq[k], qdrop0[k]) for k in brecq)
    assert not all(torch.equal(brecq[k], qdrop[k]) for k in brecq)  # dropping does something


def _conv_output_stats(qg, x: torch.Tensor, name: str, quantized: bool = True):
    from qcli.quant.quantizer import QuantMode, quant_mode

    mode = QuantMode.QUANTIZE if quantized else QuantMode.OFF
    layer = dict(qg.module.named_modules())[name]
    stats = ChannelStats()
    h = layer.register_forward_hook(lambda m, a, out: stats.update(out.detach()))
    with torch.no_grad(), quant_mode(qg.select(), mode):
        qg.module(x)
    h.remove()
    return stats.result()


def test_bn_tuning_restores_a_shifted_statistic():
    qg, x = _calibrated(BitConfig(8, 8))
    reference = float_twin(qg)
    mean_fp, std_fp = _conv_output_stats(qg, x, "3", quantized=False)
    layer = dict(qg.module.named_modules())["3"]
    with torch.no_grad():  # plant a per-channel gain and shift, as quantization might
        layer.weight.mul_(torch.linspace(0.6, 1.5, 8).reshape(-1, 1, 1, 1))
        layer.weight_quantizer.scale.mul_(torch.linspace(0.6, 1.5, 8))
        layer.bias.add_(0.3)
    mean_bad, std_bad = _conv_output_stats(qg, x, "3")
    assert (mean_bad - mean_fp).abs().max() > 0.2 and (std_bad / std_fp - 1).abs().max() > 0.2
    tune_statistics(qg, reference, x, match_std=True, batch_size=16)
    mean_q, std_q = _conv_output_stats(qg, x, "3")
    assert (mean_q - mean_fp).abs().max() < 0.05
    assert (std_q / std_fp - 1).abs().max() < 0.05


def test_bias_tuning_removes_a_planted_output_bias():
    qg, x = _calibrated(BitConfig(8, 8))
    lin = dict(qg.module.named_modules())["8"]
    reference = float_twin(qg)
    with torch.no_grad():
        clean = qg.module(x)
        lin.bias.add_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        assert (qg.module(x) - clean).mean(0).abs().max() > 0.4
    tune_statistics(qg, reference, x, match_std=False, batch_size=16)
    with torch.no_grad():
        fp = reference.module(x)
        q = qg.module(x)
    assert (q - fp).mean(0).abs().max() < 0.05


def test_settings_reject_bad_values():
    from qcli.errors import UsageError

    with pytest.raises(UsageError, match="--fisher"):
        recipes.settings_for("brecq", {"fisher": True, "granularity": "layer"})
    with pytest.raises(UsageError, match="--iters"):
        recipes.settings_for("qdrop", {"iters": 0})


# ------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "method,extra",
    [
        ("adaround", ()),
        ("adaquant", ("--bias-tune",)),
        ("brecq", ("--fisher",)),
        ("qdrop", ("--bn-tune", "--granularity", "stage")),
    ],
)
def test_method_round_trips_through_onnxruntime(
    tmp_path: Path, weights: Path, images: Path, method: str, extra: tuple[str, ...]
):
    out = tmp_path / f"{method}.qcli"
    code, stdout, err = calibrate_r20(
        weights,
        images,
        "--bits",
        "w4a8",
        "--method",
        method,
        "--iters",
        "3",
        "--out",
        out,
        "--json",
        *extra,
    )
    assert code == 0, err
    result = json.loads(stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    units = manifest["metrics"]["reconstruction"]["units"]
    assert units and all("loss_before" in u and "loss_after" in u for u in units)
    assert result["method"] == method
    # export runs onnxruntime beside the reloaded simulation and fails on disagreement
    code, _, err = run("export", out, "--out", tmp_path / f"{method}.onnx")
    assert code == 0, err


def test_show_units_needs_no_data(weights: Path):
    code, stdout, err = run(
        "calibrate",
        "builtin:resnet20_cifar10",
        "--weights",
        weights,
        "--method",
        "brecq",
        "--show-units",
        "--json",
    )
    assert code == 0, err
    units = json.loads(stdout)["units"]
    assert [u["unit"] for u in units][:2] == ["conv1", "layer1.0"] and len(units) == 11


def test_calibrate_without_data_is_a_usage_error(weights: Path, tmp_path: Path):
    code, _, err = run(
        "calibrate", "builtin:resnet20_cifar10", "--weights", weights, "--out", tmp_path / "q"
    )
    assert code == 2 and "--data" in err


def test_quantize_below_8_bits_reconstructs_and_bn_tunes(tmp_path: Path, weights, images):
    out = tmp_path / "q"
    code, _, err = run(
        "quantize", "builtin:resnet20_cifar10", "--weights", weights, "--data", images,
        "--bits", "w4a8", "--iters", "2", "--no-latency", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "model.qcli" / "manifest.json").read_text())
    assert manifest["method"]["name"] == "qdrop" and manifest["method"]["bn_tune"] is True
    assert manifest["method"]["settings"]["iters"] == 2
    assert manifest["method"]["settings"]["stop"] == "fixed"  # real images: every step


def test_quantize_bn_tunes_at_8_bits_unless_told_not_to(tmp_path: Path, weights, images):
    for flags, expected in (((), True), (("--no-bn-tune",), False)):
        out = tmp_path / f"q{expected}"
        code, _, err = run(
            "quantize", "builtin:resnet20_cifar10", "--weights", weights, "--data", images,
            "--no-latency", "--out", out, *flags,
        )  # fmt: skip
        assert code == 0, err
        manifest = json.loads((out / "model.qcli" / "manifest.json").read_text())
        assert manifest["method"]["name"] == "mse" and manifest["bits"] == "w8a8"
        assert manifest["method"]["bn_tune"] is expected


def test_quantize_effort_flags_follow_the_method(tmp_path: Path, weights, images):
    """--stop reaches a reconstruction method, and is refused where the method has no units."""
    from qcli.stages.quantize import QuantizeConfig, method_settings, one_shot_effort

    cfg = QuantizeConfig(None, tmp_path / "q", stop="fixed")
    assert method_settings("qdrop", cfg) == {**one_shot_effort(cfg.bits), "stop": "fixed"}
    narrow = QuantizeConfig(None, tmp_path / "q", BitConfig(4, 4))
    assert method_settings("brecq", narrow)["iters"] > method_settings("qdrop", cfg)["iters"]
    free = method_settings("qdrop", QuantizeConfig(None, tmp_path / "q"))
    assert free["stop"] == "plateau"  # generated images stop on a plateau
    assert method_settings("mse", QuantizeConfig(None, tmp_path / "q")) == {}
    asked = method_settings("qdrop", QuantizeConfig(None, tmp_path / "q", iters=300))
    assert asked["iters"] == 300 and "budget" not in asked  # asked-for iterations are run
    code, _, err = run(
        "quantize", "builtin:resnet20_cifar10", "--weights", weights, "--data", images,
        "--bits", "w8a8", "--stop", "fixed", "--no-latency", "--out", tmp_path / "q8",
    )  # fmt: skip
    assert code == 2 and "--stop" in err and "mse" in err, err
    assert not (tmp_path / "q8").exists()


def test_progress_is_cost_weighted_and_names_each_unit():
    """The bar's total is what the run reports, units weigh by their activation size (so the
    time-left estimate holds), and each unit announces itself once."""
    qg, x = _calibrated(BitConfig(4, 8))
    settings = {"iters": 3, "batch_size": 16}
    calls: list[tuple[int, str | None]] = []
    CALIBRATION_METHODS["adaround"].run(
        qg, x.split(16), settings, lambda n, label=None, skip=0: calls.append((n, label))
    )
    assert sum(n for n, _ in calls) == recipes.total_steps(qg, "adaround", settings, len(x))
    labels = [label for _, label in calls if label]
    units = [u for step in unit_plan(qg, "layer") for u in step.units]
    assert labels == [f"unit {i}/{len(units)} {u.name}" for i, u in enumerate(units, 1)]
    costs = [R.unit_cost(qg, u) for u in units]
    assert costs[0] > costs[-1]  # an 8x8x8 conv output weighs more than the 4 logits


def _scripted(losses: list[float]):
    """A step function that returns the given losses in turn, counting its calls."""
    calls = []

    def step(beta):
        assert beta is None  # the free phase runs without the rounding regularizer
        calls.append(1)
        return torch.tensor(losses[len(calls) - 1])

    return step, calls


def test_free_phase_stops_when_the_window_loss_stops_improving():
    s = recipes.settings_for("qdrop", {"iters": 1000, "stop": "plateau", "plateau_window": 5})
    # windows: 10 -> 5 (improves) -> 4.99, 4.98 (under 2% on the best twice: plateau)
    losses = [10.0] * 5 + [5.0] * 5 + [4.99] * 5 + [4.98] * 5 + [1.0] * 200
    step, calls = _scripted(losses)
    assert R._free_phase(step, s) == 20 == len(calls)
    # one noisy window does not end it: the next one beats the best again
    losses = [10.0] * 5 + [5.0] * 5 + [5.5] * 5 + [4.0] * 5 + [3.99] * 10 + [1.0] * 200
    step, calls = _scripted(losses)
    assert R._free_phase(step, s) == 30 == len(calls)
    # a loss that keeps improving runs until the ceiling's warm-up share
    step, calls = _scripted([0.9**i for i in range(300)])
    assert R._free_phase(step, s) == 200 == len(calls)  # 0.2 * 1000


def test_anneal_phase_keeps_the_warmup_ratio_within_the_ceiling():
    s = recipes.settings_for("qdrop", {"iters": 100, "stop": "plateau"})
    assert R._anneal_steps(10, s) == 40  # warm-up 20%: four annealing steps per free step
    assert R._anneal_steps(20, s) == 80
    assert R._anneal_steps(20, replace(s, iters=50)) == 30  # the ceiling caps the total


def test_plateau_stops_early_and_the_bar_total_shrinks_to_the_steps_taken():
    """An easy problem stops well before the ceiling; every planned step is either done or
    skipped, so the bar ends full and its time-left estimate counts only the work left."""
    qg, x = _calibrated(BitConfig(4, 8))
    settings = {"iters": 400, "batch_size": 16, "stop": "plateau"}
    done, skipped = [], []

    def progress(n, label=None, skip=0):
        done.append(n)
        skipped.append(skip)

    metrics = CALIBRATION_METHODS["brecq"].run(qg, x.split(16), settings, progress)
    units = metrics["reconstruction"]["units"]
    steps = [u["steps"] for u in units]
    assert min(steps) < 400 and len(set(steps)) > 1, steps  # stopped early, each unit its own
    assert sum(done) + sum(skipped) == recipes.total_steps(qg, "brecq", settings, len(x))
    costs = [R.unit_cost(qg, u) for step in unit_plan(qg, "block") for u in step.units]
    assert sum(done) == sum(c * u["steps"] for c, u in zip(costs, units, strict=True))


def test_fixed_mode_runs_every_iteration():
    qg, x = _calibrated(BitConfig(4, 8))
    settings = {"iters": 7, "batch_size": 16}
    metrics = CALIBRATION_METHODS["brecq"].run(qg, x.split(16), settings, None)
    assert [u["steps"] for u in metrics["reconstruction"]["units"]] == [7] * len(
        metrics["reconstruction"]["units"]
    )


def test_stop_mode_is_validated():
    with pytest.raises(Exception, match="--stop"):
        recipes.settings_for("qdrop", {"stop": "sometimes"})


def test_budget_lowers_the_iterations_to_fit_and_records_them():
    qg, x = _calibrated(BitConfig(4, 8))
    cost = sum(R.unit_cost(qg, u) for step in unit_plan(qg, "block") for u in step.units)
    per_step = cost * 1e3 * 16  # activation elements per step at batch 16
    settings = {"iters": 400, "batch_size": 16, "budget": 25 * per_step / 1e9}
    assert recipes.total_steps(qg, "brecq", settings, len(x)) == 25 * cost
    metrics = CALIBRATION_METHODS["brecq"].run(qg, x.split(16), settings, None)
    assert metrics["reconstruction"]["settings"]["iters"] == 25
    assert {u["steps"] for u in metrics["reconstruction"]["units"]} == {25}
    big = {**settings, "budget": 1e6}  # a budget beyond the ceiling leaves it alone
    assert R.within_budget(qg, recipes.settings_for("brecq", big), len(x)).iters == 400
    tiny = {**settings, "budget": 1e-9}  # never below 10 steps a unit
    assert R.within_budget(qg, recipes.settings_for("brecq", tiny), len(x)).iters == 10


def test_rounding_restored_takes_off_what_was_attached_inside():
    """MetaAug's meta phase attaches learned rounding only to read the unit's tensors: the
    context manager gives every quantizer back the rounding it had, also on an exception."""
    from qcli.quant.quantizer import Quantizer
    from qcli.quant.rounding import attach_adaround, rounding_restored
    from qcli.quant.spec import QuantSpec

    q = Quantizer(QuantSpec(4, True, True, True), channels=2)
    w = torch.randn(2, 3)
    q.set_qparams(torch.full((2,), 0.1), torch.zeros(2))
    kept = attach_adaround(q, w)
    with rounding_restored([q]):
        attach_adaround(q, w)
        assert q.rounding is not kept
    assert q.rounding is kept
    q.rounding = None
    with pytest.raises(RuntimeError), rounding_restored([q]):
        attach_adaround(q, w)
        raise RuntimeError("inside")
    assert q.rounding is None


def test_the_engine_names_no_method():
    """MRECG and MetaAug are recipes over the engine (methods/recipes.py), not part of it."""
    import inspect

    source = inspect.getsource(R).lower()
    assert "mrecg" not in source and "metaaug" not in source
