"""DGH data generation: set-level statistics, each ablation switch, the CLI and its errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from qcli.artifacts import read_dataset
from qcli.errors import UsageError
from qcli.methods.generators.bn_stats import (
    BNInputMoments,
    SetMoments,
    bn_layers,
    bn_stat_loss,
    bn_targets,
    set_moments,
)
from qcli.methods.generators.dgh import (
    CosineLR,
    DghSettings,
    PlateauLR,
    generate_dgh,
    make_pipeline,
)
from qcli.methods.generators.images import pixel_bounds
from qcli.methods.registry import DATA_METHODS
from qcli.stages.quantize import QuantizeConfig
from test_bns import SPEC, _tiny_net
from test_cli import R20, run

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = DghSettings(num_images=8, batch_size=4, iters=3)


def _split_moments(net: nn.Module, x: torch.Tensor, batch: int) -> SetMoments:
    layers = bn_layers(net)
    with BNInputMoments(layers) as hooks:
        batches = x.split(batch)
        return set_moments(net, hooks, batches, [len(b) for b in batches])


def _bn_inputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every BN layer's input for the whole of x in one pass (the reference)."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for m in bn_layers(net)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(("n", "batch"), [(8, 8), (8, 2), (10, 4), (11, 3), (9, 8)])
def test_aggregated_statistics_equal_those_of_the_concatenated_images(n: int, batch: int):
    net = _tiny_net()
    x = torch.randn(n, 3, 16, 16)
    total = _split_moments(net, x, batch).total()
    for (mean, mean_sq), inputs in zip(total, _bn_inputs(net, x), strict=True):
        var, ref_mean = torch.var_mean(inputs, dim=(0, 2, 3), unbiased=False)
        assert torch.allclose(mean, ref_mean, atol=1e-5)
        assert torch.allclose(mean_sq - mean.square(), var, atol=1e-5)


@pytest.mark.parametrize(("n", "batch", "b"), [(8, 4, 1), (10, 4, 2), (9, 3, 0)])
def test_one_batch_with_grad_gives_the_gradient_of_the_whole_set_loss(n: int, batch: int, b: int):
    """Only batch b is differentiable, the others are cached constants: its gradient must be
    that of the BN loss computed on all N images at once."""
    net = _tiny_net()
    layers = bn_layers(net)
    targets = bn_targets(layers, torch.device("cpu"))
    x = torch.randn(n, 3, 16, 16)
    cache = _split_moments(net, x, batch)
    parts = list(x.split(batch))
    xb = parts[b].clone().requires_grad_()
    with BNInputMoments(layers) as hooks:
        net(xb)
        bn_stat_loss(cache.combine(b, hooks.moments), targets).backward()
        full = x.clone().requires_grad_()
        hooks.clear()
        net(full)
        bn_stat_loss(hooks.moments, targets).backward()
    start = b * batch
    assert torch.allclose(xb.grad, full.grad[start : start + len(xb)], rtol=1e-4, atol=1e-9)


def test_no_aggregate_matches_per_batch_statistics():
    """With one batch, the set is the batch: the switch changes nothing. With two batches it
    changes the loss the images are optimized for."""
    net = _tiny_net()
    one = dict(num_images=4, batch_size=4, iters=4)
    a, _ = generate_dgh(net, SPEC, DghSettings(**one))
    b, _ = generate_dgh(net, SPEC, DghSettings(**one, aggregate=False))
    assert torch.equal(a, b)
    two = dict(num_images=8, batch_size=4, iters=4)
    c, mc = generate_dgh(net, SPEC, DghSettings(**two))
    d, md = generate_dgh(net, SPEC, DghSettings(**two, aggregate=False))
    assert not torch.equal(c, d)
    assert mc["final_step_bn_loss"] != md["final_step_bn_loss"]


def test_zoom_and_color_shift_change_the_train_view_but_not_the_final_one():
    cpu = torch.device("cpu")
    plain = make_pipeline(DghSettings(), SPEC, cpu)
    zoom = make_pipeline(DghSettings(zoom=0.5), SPEC, cpu)
    color = make_pipeline(DghSettings(color_shift=0.3), SPEC, cpu)
    x = torch.randn(2, 3, 16 + plain.extra, 16 + plain.extra).clamp(-1, 1)
    views = [p.train(x, random.Random(3)) for p in (plain, zoom, color)]
    assert all(v.shape == (2, 3, 16, 16) for v in views)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    # a flat image stays flat under zoom; a colour shift moves each channel by one affine map
    flat = torch.full((1, 3, 18, 18), 0.25)
    assert torch.allclose(zoom.train(flat, random.Random(1)), torch.full((1, 3, 16, 16), 0.25))
    ramp = torch.linspace(-1, 1, 18).expand(1, 3, 18, 18)
    base, shifted = plain.train(ramp, random.Random(1)), color.train(ramp, random.Random(1))
    p, q = base.flatten(2)[0], shifted.flatten(2)[0]  # [C, pixels]; same flip and crop drawn
    pc, qc = p - p.mean(1, keepdim=True), q - q.mean(1, keepdim=True)
    gain = (pc * qc).sum(1, keepdim=True) / pc.square().sum(1, keepdim=True)
    assert torch.allclose(qc, gain * pc, atol=1e-5)  # one affine map per channel ...
    assert not torch.allclose(gain, torch.ones_like(gain))  # ... that is not the identity
    for p in (zoom, color):
        assert torch.equal(p.final(x), plain.final(x))
    with pytest.raises(UsageError, match="zoom"):
        generate_dgh(_tiny_net(), SPEC, dataclasses.replace(FAST, zoom=1.0))


def test_no_augment_makes_the_pipeline_the_identity():
    x = torch.randn(2, 3, 16, 16)
    off = make_pipeline(DghSettings(augment=False), SPEC, torch.device("cpu"))
    assert off.extra == 0
    assert off.train(x, random.Random(0)) is x and off.final(x) is x
    on = make_pipeline(DghSettings(), SPEC, torch.device("cpu"))
    assert on.extra == 16 // 7
    padded = torch.randn(2, 3, 16 + on.extra, 16 + on.extra)
    assert on.train(padded, random.Random(0)).shape == (2, 3, 16, 16)
    flat = torch.full((1, 3, 18, 18), 0.5)
    assert torch.allclose(on.final(flat), torch.full((1, 3, 16, 16), 0.5))  # smoothing keeps it
    _, metrics = generate_dgh(_tiny_net(), SPEC, dataclasses.replace(FAST, augment=False))
    assert metrics["extra_pixels"] == 0


def test_no_output_loss_removes_exactly_that_term():
    net = _tiny_net()
    off, m_off = generate_dgh(net, SPEC, dataclasses.replace(FAST, output_loss=False))
    zero, m_zero = generate_dgh(net, SPEC, dataclasses.replace(FAST, output_weight=0.0))
    strong, _ = generate_dgh(net, SPEC, dataclasses.replace(FAST, output_weight=1.0))
    assert m_off["final_output_loss"] is None and m_zero["final_output_loss"] < 0
    assert torch.equal(off, zero)  # the term at weight 0 is the term switched off
    assert not torch.equal(off, strong)


def test_regularized_output_loss_runs_and_differs():
    net = _tiny_net()
    reg, metrics = generate_dgh(
        net, SPEC, dataclasses.replace(FAST, output_kind="regularized", output_weight=1.0)
    )
    plain, _ = generate_dgh(net, SPEC, dataclasses.replace(FAST, output_weight=1.0))
    assert metrics["final_output_loss"] > 0 and not torch.equal(reg, plain)
    assert not any(m._forward_pre_hooks for m in net.modules())


def test_images_are_valid_seeded_and_the_bn_loss_falls():
    net = _tiny_net()
    steps: list[int] = []
    settings = DghSettings(num_images=10, batch_size=4, iters=20)
    a, metrics = generate_dgh(net, SPEC, settings, progress=steps.append)
    b, _ = generate_dgh(net, SPEC, settings)
    assert a.shape == (10, 3, 16, 16) and a.is_contiguous() and torch.equal(a, b)
    lo, hi = pixel_bounds(SPEC, torch.device("cpu"))
    assert bool(((a >= lo) & (a <= hi)).all())
    assert steps == list(range(1, 3 * 20 + 1))
    assert metrics["final_bn_loss"] < 0.3 * metrics["initial_bn_loss"]


def test_plateau_schedule_halves_after_patience_and_stops_at_min_lr():
    lr = torch.tensor(1.0)
    schedule = PlateauLR(lr, DghSettings(patience=2, min_lr=0.3))
    for loss in (1.0, 0.5, 0.6, 0.6):
        schedule.step(torch.tensor(loss))
    assert float(lr) == 1.0
    schedule.step(torch.tensor(0.6))
    assert float(lr) == 0.5
    for _ in range(6):
        schedule.step(torch.tensor(0.6))
    assert float(lr) == pytest.approx(0.3)


def test_model_without_batchnorm_is_refused_with_a_suggestion():
    with pytest.raises(Exception, match="--method noise"):
        generate_dgh(_tiny_net(bn=False), SPEC, FAST)


def test_registered_with_its_settings_and_quantize_defaults_to_it():
    assert DATA_METHODS["dgh"].run is generate_dgh
    assert DATA_METHODS["dgh"].settings is DghSettings
    assert QuantizeConfig.__dataclass_fields__["gen_method"].default == "dgh"


# ---------------------------------------------------------------- the command line


def test_cli_manifest_round_trips_preview_and_calibrates(tmp_path: Path, weights: Path):
    out, grid = tmp_path / "calib", tmp_path / "grid.png"
    code, stdout, err = run(
        "generate-data", R20, "--weights", weights, "--num-images", 6, "--batch-size", 4,
        "--iters", 2, "--seed", 3, "--no-augment", "--preview", grid, "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    stored = read_dataset(out)
    manifest = stored.manifest
    assert manifest["method"] == "dgh" and manifest["seed"] == 3
    settings = DghSettings(**manifest["settings"])
    assert settings == DghSettings(num_images=6, batch_size=4, iters=2, seed=3, augment=False)
    metrics = manifest["metrics"]
    assert {"initial_bn_loss", "final_bn_loss", "final_output_loss"} <= set(metrics)
    assert metrics["final_bn_loss"] == pytest.approx(result["final_bn_loss"])
    assert stored.images.shape == (6, 3, 32, 32) and stored.labels is None
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.size == (3 * 34 + 2, 2 * 34 + 2)
    q = tmp_path / "m.qcli"
    code, _, err = run(
        "calibrate", R20, "--weights", weights, "--data", out, "--method", "mse", "--out", q
    )
    assert code == 0, err
    assert (q / "manifest.json").is_file()


def _no_bn_model(tmp_path: Path) -> Path:
    path = tmp_path / "nobn.pt"
    torch.save(_tiny_net(bn=False), path)
    return path


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--num-images", 0], 2, "--num-images"),
        (["--num-images", -3], 2, "--num-images"),
        (["--num-images", 4, "--batch-size", 8], 2, "--batch-size"),
        (["--method", "bns", "--no-augment"], 2, "--no-augment"),
        (["--method", "bns", "--optimizer", "adam"], 2, "--optimizer"),
        (["--method", "noise", "--coarse-share", 0.5], 2, "--coarse-share"),
        (["--method", "bns", "--idle-state", "compact"], 2, "--idle-state"),
        (["--idle-state", "compact"], 2, "adafactor"),
        (["--iters", 0], 2, "--iters"),
    ],
)
def test_cli_bad_settings(tmp_path: Path, weights: Path, args: list, code: int, needle: str):
    got, _, err = run("generate-data", R20, "--weights", weights, *args, "--out", tmp_path / "o")
    assert got == code and needle in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_cli_unwritable_output_and_model_without_bn(tmp_path: Path, weights: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    common = ["--num-images", 2, "--batch-size", 2, "--iters", 1]
    code, _, err = run("generate-data", R20, "--weights", weights, *common, "--out", blocker / "o")
    assert code == 1 and "cannot write" in err and "Traceback" not in err
    model = _no_bn_model(tmp_path)
    code, _, err = run(
        "generate-data", model, "--trust-pickle", "--image-size", 16, *common,
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 1 and "BatchNorm" in err and "--method noise" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_cosine_schedule_falls_monotonically_from_lr_to_min_lr_whatever_the_loss():
    lr = torch.tensor(0.4)
    schedule = CosineLR(lr, DghSettings(min_lr=0.01), steps=8)
    seen = []
    for loss in (1.0, 2.0, 0.5, 3.0, 0.1, 0.1, 9.0, 0.1, 0.1):  # one past the end
        schedule.step(torch.tensor(loss))
        seen.append(float(lr))
    assert seen[3] == pytest.approx(0.01 + 0.39 * 0.5)  # half way: the mean of the two ends
    assert all(a > b for a, b in itertools.pairwise(seen[:8]))
    assert seen[7] == pytest.approx(0.01) and seen[8] == pytest.approx(0.01)


def test_cosine_schedule_runs_per_phase_and_differs_from_plateau():
    net = _tiny_net()
    cos = dataclasses.replace(FAST, optimizer="adam", lr=0.2, schedule="cosine")
    a, metrics = generate_dgh(net, SPEC, cos)
    b, _ = generate_dgh(net, SPEC, dataclasses.replace(cos, schedule="plateau"))
    assert not torch.equal(a, b)
    assert metrics["final_bn_loss"] < metrics["initial_bn_loss"]
    with pytest.raises(UsageError, match="schedule"):
        generate_dgh(net, SPEC, dataclasses.replace(FAST, schedule="step"))


def test_coarse_to_fine_runs_every_iteration_and_lowers_the_loss():
    """A coarse phase at half size, then full size: the right number of steps, full-size
    images, seeded, and a set BN loss below the noise it started from."""
    net = _tiny_net()
    settings = DghSettings(num_images=8, batch_size=4, iters=12, coarse_share=0.5, seed=2)
    steps: list[int] = []
    a, metrics = generate_dgh(net, SPEC, settings, progress=steps.append)
    b, _ = generate_dgh(net, SPEC, settings)
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b)
    assert steps[-1] == 2 * 12 == len(steps)
    assert metrics["final_bn_loss"] < metrics["initial_bn_loss"]
    plain, _ = generate_dgh(net, SPEC, dataclasses.replace(settings, coarse_share=0.0))
    assert not torch.equal(a, plain)  # the phase is really there


def test_adam_is_an_optimizer_choice_and_unknown_ones_are_refused():
    net = _tiny_net()
    a, _ = generate_dgh(net, SPEC, dataclasses.replace(FAST, optimizer="adam", lr=0.2))
    b, _ = generate_dgh(net, SPEC, FAST)
    assert not torch.equal(a, b)
    with pytest.raises(UsageError, match="optimizer"):
        generate_dgh(net, SPEC, dataclasses.replace(FAST, optimizer="sgd"))


def test_quantize_preset_is_the_one_the_benchmark_measured():
    """`qcli quantize`'s data-free preset is what benchmarks/results/mct.json measured: change
    the defaults, rerun benchmarks/mct_side_by_side.py."""
    from conftest import REPO
    from qcli.stages.quantize import GEN_PRESETS, QuantizeConfig

    payload = json.loads((REPO / "benchmarks" / "results" / "mct.json").read_text())
    row = next(r for r in payload["rows"] if r.get("key") == "quantize-preset")
    q = {f.name: f.default for f in dataclasses.fields(QuantizeConfig)}
    size = {"num_images": q["gen_images"], "batch_size": q["gen_batch_size"]}
    assert row["settings"] == {**size, "iters": q["gen_iters"], **GEN_PRESETS[q["gen_method"]]}


def test_cli_optimizer_and_coarse_share_reach_the_settings(tmp_path: Path, weights: Path):
    out = tmp_path / "o"
    args = ["--num-images", 4, "--batch-size", 4, "--iters", 2, "--lr", 0.15]
    code, _, err = run(
        "generate-data", R20, "--weights", weights, *args, "--optimizer", "adam",
        "--coarse-share", 0.5, "--lr-schedule", "cosine", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    settings = read_dataset(out).manifest["settings"]
    assert settings["optimizer"] == "adam" and settings["coarse_share"] == 0.5
    assert settings["schedule"] == "cosine"


def test_cli_idle_state_reaches_the_settings(tmp_path: Path, weights: Path):
    out = tmp_path / "o"
    args = ["--num-images", 8, "--batch-size", 4, "--iters", 2, "--lr", 0.15]
    code, _, err = run(
        "generate-data", R20, "--weights", weights, *args, "--optimizer", "adafactor",
        "--idle-state", "compact", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    settings = read_dataset(out).manifest["settings"]
    assert settings["optimizer"] == "adafactor" and settings["idle_state"] == "compact"
