"""QAT with ACS coresets: scores, schedule, selection, LSQ, resume, torchrun, CLI errors."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from qcli.artifacts import read_qmodel
from qcli.cli import cli
from qcli.distributed import Comm
from qcli.methods import coreset as C
from qcli.methods.qat import QATSettings, Trainer, TrainImages, augment, draw_augmentation
from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.quant import primitives as P
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.quantizer import Quantizer, QuantMode, quant_mode, replicated
from qcli.quant.spec import BitConfig, activation_spec, weight_spec
from qcli.stages.common import ModelOptions
from qcli.stages.qat import QATConfig, qat
from qcli.ui import UI

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------- scores and schedule


def test_evs_and_ds_match_hand_computed_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p_fp = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(C.evs(p, y), torch.tensor([math.sqrt(0.14), math.sqrt(1.46)]))
    torch.testing.assert_close(C.ds(p, p_fp), torch.tensor([math.sqrt(0.06), 0.0]))
    # mid-training β = 0.5: the plain mean of the two
    mid = C.acs_scores(p, p_fp, y, 5, 10)
    torch.testing.assert_close(mid, (C.evs(p, y) + C.ds(p, p_fp)) / 2)


def test_annealed_weight_at_first_middle_and_last_epoch():
    assert C.beta(0, 10) == 1.0  # pure EVS on the initial quantized model
    assert C.beta(5, 10) == pytest.approx(0.5)
    assert C.beta(9, 10) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert C.beta(9, 10) < 0.03  # DS dominates at the end


def test_coreset_has_the_requested_size_per_class_and_follows_the_scores():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    scores = torch.arange(60, dtype=torch.float32)
    picked = C.select_top(scores, labels, 0.2)
    assert torch.bincount(labels[picked]).tolist() == [2, 4, 6]
    assert picked.tolist() == [8, 9, 26, 27, 28, 29, 54, 55, 56, 57, 58, 59]
    flipped = C.select_top(-scores, labels, 0.2)
    assert torch.bincount(labels[flipped]).tolist() == [2, 4, 6]
    assert set(flipped.tolist()).isdisjoint(picked.tolist())
    g = torch.Generator().manual_seed(0)
    r1, r2 = C.select_random(labels, 0.2, g), C.select_random(labels, 0.2, g)
    assert torch.bincount(labels[r1]).tolist() == [2, 4, 6]
    assert not torch.equal(r1, r2)  # a fresh draw each time
    assert C.fingerprint(r1) != C.fingerprint(r2)


def test_scoring_shards_cover_every_image_once():
    for n in (0, 1, 7, 10):
        parts = [Comm(r, 3).shard(n) for r in range(3)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))


# ------------------------------------------------------------------------------ LSQ and augment


def test_learn_mode_scales_the_step_size_gradient_and_keeps_the_forward():
    q = Quantizer(weight_spec(4), channels=2)
    q.set_qparams(torch.tensor([0.1, 0.2]), torch.zeros(2))
    q.scale.requires_grad_(True)
    w = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    y_quant = q(w)
    (g_plain,) = torch.autograd.grad(y_quant.square().sum(), q.scale)
    with quant_mode([q], QuantMode.LEARN):
        y_learn = q(w)
        (g_learn,) = torch.autograd.grad(y_learn.square().sum(), q.scale)
    assert torch.equal(y_quant, y_learn)  # the training grid is the export grid, bit for bit
    g = P.lsq_gradient_scale(8, 7)
    assert g == pytest.approx(1 / math.sqrt(8 * 7))
    torch.testing.assert_close(g_learn, g_plain * g)
    assert q.mode is QuantMode.QUANTIZE  # the mode is restored


def test_learn_mode_step_size_gradient_does_not_depend_on_the_process_count():
    """DDP averages the slices' gradients: with `batch_replicas` = 2, the mean of the two
    halves' step-size gradients is the one-process gradient on the whole batch."""
    q = Quantizer(activation_spec(4))
    q.set_qparams(torch.tensor(0.1), torch.tensor(3.0))
    q.scale.requires_grad_(True)
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))

    def grad(batch: torch.Tensor, replicas: int) -> torch.Tensor:
        with replicated([q], replicas), quant_mode([q], QuantMode.LEARN):
            (g,) = torch.autograd.grad(q(batch).square().mean(), q.scale)
        return g

    whole = grad(x, 1)
    halves = (grad(x[:4], 2) + grad(x[4:], 2)) / 2
    torch.testing.assert_close(halves, whole)
    unscaled = (grad(x[:4], 1) + grad(x[4:], 1)) / 2  # what the slices gave before
    assert not torch.allclose(unscaled, whole)
    assert q.batch_replicas == 1  # the count is restored


def test_crop_flip_augmentation_keeps_shape_and_can_be_the_identity():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    params = draw_augmentation("crop-flip", 3, (8, 8), torch.Generator().manual_seed(0))
    assert augment(x, params, "crop-flip").shape == x.shape
    centre = params.clone()
    centre[:, 0:2], centre[:, 4] = 4, 0
    assert torch.equal(augment(x, centre, "crop-flip"), x)
    centre[:, 4] = 1
    assert torch.equal(augment(x, centre, "crop-flip"), x.flip(3))
    big = torch.randint(0, 256, (2, 3, 80, 80), dtype=torch.uint8)
    p = draw_augmentation("resized-crop-flip", 2, (80, 80), torch.Generator().manual_seed(0))
    assert augment(big, p, "resized-crop-flip").shape == big.shape


# ------------------------------------------------------------------------------ training


def _toy_task(n: int = 96) -> tuple[nn.Module, TrainImages]:
    """Three classes told apart by which colour channel is bright."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    pixels = torch.randint(0, 120, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    pixels[torch.arange(n), labels] += 120
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    return net, TrainImages(pixels, labels, lambda u: u.float() / 255 - 0.5)


def _loss(qg, data: TrainImages) -> float:
    with torch.no_grad():
        out = qg(data.normalize(data.pixels))
    return float(nn.functional.cross_entropy(out, data.labels))


def test_qat_lowers_the_loss_of_a_tiny_quantized_model():
    torch.manual_seed(0)
    net, data = _toy_task()
    qg = capture(net, (3, 8, 8), QuantPlan.uniform(BitConfig(4, 4)))
    set_weight_ranges(qg, "mse")
    set_activation_ranges(qg, [data.normalize(data.pixels)], "mse")
    before = _loss(qg, data)
    s = QATSettings(
        epochs=8, coreset="acs", fraction=0.5, interval=2, kd=False, lr=0.05, batch_size=16
    )
    s = replace(s, augment="none")
    history = Trainer(qg, net, data, s, Comm()).run(lambda *a: _no_progress())
    assert all(q.mode is QuantMode.QUANTIZE for q in qg.select())
    assert [h.coreset for h in history] == [48] * 8
    assert [h.selected for h in history] == [True, False] * 4
    assert _loss(qg, data) < 0.8 * before


@contextlib.contextmanager
def _no_progress():
    yield lambda n=1, label=None, skip=0: None


def _acs_selection(qg, teacher: nn.Module, data: TrainImages, s: QATSettings, epoch: int):
    """ACS's coreset computed from the model as it is now, outside the trainer: softmax of
    the quantized and the float model (eval mode, no augmentation), scores, top share."""

    def softmax(module: nn.Module, quantized: bool) -> torch.Tensor:
        was = module.training
        module.eval()
        mode = QuantMode.QUANTIZE if quantized else QuantMode.OFF
        out = []
        with torch.no_grad(), quant_mode(qg.select(), mode):
            for chunk in data.pixels.split(s.batch_size):
                out.append(torch.softmax(module(data.normalize(chunk)), 1))
        module.train(was)
        return torch.cat(out)

    probs, fp = softmax(qg.module, True), softmax(teacher, False)
    scores = C.acs_scores(probs, fp, data.labels, epoch, s.epochs)
    return C.select_top(scores, data.labels, s.fraction)


def test_trainer_trains_on_the_acs_coreset_of_the_model_at_that_epoch():
    """Every selection is `select_top(acs_scores(...))` of the quantized model as it stands
    before that epoch (not just a coreset of the right size)."""
    torch.manual_seed(0)
    net, data = _toy_task()
    qg = capture(net, (3, 8, 8), QuantPlan.uniform(BitConfig(4, 4)))
    set_weight_ranges(qg, "mse")
    set_activation_ranges(qg, [data.normalize(data.pixels)], "mse")
    s = QATSettings(epochs=4, coreset="acs", fraction=0.25, interval=1, kd=False, lr=0.05)
    s = replace(s, batch_size=16, augment="none")
    trainer = Trainer(qg, net, data, s, Comm())
    expected = [_acs_selection(qg, net, data, s, 0)]
    chosen = []

    def after_epoch(t: Trainer, stats) -> None:
        chosen.append(t.coreset.clone())
        if t.epoch < s.epochs:
            expected.append(_acs_selection(qg, net, data, s, t.epoch))

    trainer.run(lambda *a: _no_progress(), after_epoch)
    assert len(chosen) == 4
    for epoch, (got, want) in enumerate(zip(chosen, expected, strict=True)):
        assert torch.equal(got, want), f"epoch {epoch}: the trainer's coreset is not ACS's"
    assert len({C.fingerprint(c) for c in chosen}) > 1  # the scores moved with the model


# --------------------------------------------------------------------------- stage and CLI


class _Interrupt(UI):
    """Ctrl-C on the second step of the given epoch."""

    def __init__(self, epoch_label: str) -> None:
        self.label = epoch_label

    @contextlib.contextmanager
    def task(self, description, total):
        steps = 0

        def advance(n=1, label=None, skip=0):
            nonlocal steps
            steps += n
            if description == self.label and steps == 2:
                raise KeyboardInterrupt

        yield advance


def _cfg(weights: Path, images: Path, out: Path, **kw) -> QATConfig:
    s = QATSettings(epochs=4, coreset="random", fraction=0.5, interval=2, batch_size=4)
    model = ModelOptions("builtin:resnet20_cifar10", weights=str(weights))
    return QATConfig(model, images, out, s, bits=BitConfig(4, 4), calib_images=16, **kw)


def test_resume_after_an_interruption_gives_the_same_model(weights, images, tmp_path):
    whole = _cfg(weights, images, tmp_path / "whole.qcli")
    qat(whole, UI())
    cut = _cfg(weights, images, tmp_path / "cut.qcli")
    with pytest.raises(KeyboardInterrupt):
        qat(cut, _Interrupt("epoch 4/4"))
    assert not cut.out.exists() and cut.checkpoint_path().is_file()
    result = qat(replace(cut, resume=True), UI())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]
    assert not cut.checkpoint_path().exists()  # removed once the output is written
    _, a = read_qmodel(whole.out)
    _, b = read_qmodel(cut.out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _flat_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    return root


def test_cli_errors_are_usage_errors(weights, images, tmp_path):
    base = ["qat", "builtin:resnet20_cifar10", "--weights", str(weights), "--bits", "w4a4"]
    flat = _flat_folder(tmp_path / "flat")
    r = CliRunner().invoke(cli, [*base, "--train-data", str(flat), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2
    assert "no class subfolders" in r.output and "--coreset acs needs them" in r.output
    full = ["--coreset", "full", "--fraction", "0.2"]
    r = CliRunner().invoke(
        cli, [*base, "--train-data", str(images), *full, "--out", str(tmp_path / "b")]
    )
    assert r.exit_code == 2
    assert "--fraction does not apply to --coreset full" in r.output
    r = CliRunner().invoke(
        cli, ["qat", "builtin:resnet20_cifar10", "--train-data", str(images), "--out", "c"]
    )
    assert r.exit_code == 2 and "needs --bits" in r.output


@pytest.mark.slow
def test_torchrun_two_processes_select_identical_coresets_and_write_one_output(
    weights, images, tmp_path
):
    out = tmp_path / "ddp.qcli"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "qcli", "qat", "builtin:resnet20_cifar10", "--weights", str(weights)]
    cmd += ["--train-data", str(images), "--bits", "w4a4", "--epochs", "2", "--interval", "1"]
    cmd += ["--fraction", "0.5", "--batch-size", "4", "--calib-images", "16"]
    cmd += ["--out", str(out), "--json"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)  # one JSON document: rank 0 alone reports
    assert result["processes"] == 2
    assert len(result["fingerprints"]) == 2  # one selection per epoch
    for per_rank in result["fingerprints"]:
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    manifest, _ = read_qmodel(out)
    assert manifest["qat"]["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.qcli"]  # no checkpoint left
    r = CliRunner().invoke(cli, ["export", str(out), "--out", str(tmp_path / "m.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    check = json.loads(r.stdout)["check"]
    assert check["disagreement_pct"] == 0.0


def _one_lsq_step(comm: Comm) -> dict[str, torch.Tensor]:
    """Activation step sizes before and after one SGD step on the whole 96-image toy set,
    split over `comm`'s processes (plain SGD-Nesterov: the step is proportional to the
    step-size gradient, which LSQ's gradient scale sets)."""
    torch.manual_seed(0)
    net, data = _toy_task()
    qg = capture(net, (3, 8, 8), QuantPlan.uniform(BitConfig(4, 4)))
    set_weight_ranges(qg, "mse")
    set_activation_ranges(qg, [data.normalize(data.pixels)], "mse")
    acts = dict(qg.act_quantizers())
    before = {f"before/{k}": q.scale.detach().clone() for k, q in acts.items()}
    # lr 1: one step from the calibrated scales, large enough to compare in float32
    s = QATSettings(epochs=1, coreset="full", kd=False, lr=1.0, batch_size=len(data))
    Trainer(qg, net, data, replace(s, augment="none"), comm).run(lambda *a: _no_progress())
    return {**before, **{f"after/{k}": q.scale.detach().clone() for k, q in acts.items()}}


_LSQ_WORKER = """
import sys
import torch
from qcli.distributed import start, stop
from test_qat import _one_lsq_step

comm = start(torch.device("cpu"))
scales = _one_lsq_step(comm)
if comm.primary:
    torch.save(scales, sys.argv[1])
stop(comm)
"""


@pytest.mark.slow
def test_torchrun_two_processes_take_the_one_process_lsq_step(tmp_path):
    """One step on the same global batch moves every activation step size as far under two
    processes as under one: LSQ's N counts the whole batch, not one process's slice."""
    script, out = tmp_path / "worker.py", tmp_path / "scales.pt"
    script.write_text(_LSQ_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), tests]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [*cmd, str(script), str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    two, one = torch.load(out), _one_lsq_step(Comm())
    names = [k.removeprefix("after/") for k in one if k.startswith("after/")]
    assert names and two.keys() == one.keys()
    for name in names:
        start = one[f"before/{name}"]
        assert torch.equal(two[f"before/{name}"], start), name  # the same calibration
        step = one[f"after/{name}"] - start
        assert step.abs().min() > 1e-4 * start.abs().max(), name  # a step to compare
        torch.testing.assert_close(
            two[f"after/{name}"] - start,
            step,
            rtol=1e-3,
            atol=0.0,
            msg=lambda m, n=name: f"{n}: {m}",
        )
