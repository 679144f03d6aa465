"""The calibration registry: a method brings its own typed settings and capabilities, and the
CLI's options, the "does not apply" check and `quantize`'s default follow from them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcli.cli import cli
from qcli.errors import UsageError
from qcli.methods import registry
from qcli.methods.registry import (
    CALIBRATION_METHODS,
    CalibrationMethod,
    Capabilities,
    calibration_flags,
    check_settings,
    setting,
)
from qcli.quant.spec import BitConfig
from qcli.stages.quantize import DEFAULT_METHOD, ONE_SHOT_ITERS, default_method


@dataclasses.dataclass(frozen=True)
class _ToySettings:
    sharpness: float | None = setting("--sharpness", "Toy: how sharp.", kind=float, low=0)


def _toy(monkeypatch, name: str = "toy", caps: Capabilities | None = None) -> None:
    caps = caps or Capabilities()
    method = CalibrationMethod(name, lambda *a: {}, "a toy", (_ToySettings,), caps)
    monkeypatch.setitem(CALIBRATION_METHODS, name, method)


def _help(command: str) -> str:
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    return " ".join(result.stdout.split())


def test_every_method_setting_is_a_calibrate_option_with_its_help():
    text = _help("calibrate")
    flags = calibration_flags()
    assert {"iters", "granularity", "merges", "metaaug", "meta_lr", "batch_size"} <= set(flags)
    for flag in flags.values():
        assert flag.flag in text
        assert " ".join(flag.help.split()) in text, flag.flag
    assert "[layer|block|stage|mrecg]" in text and "[loss|data-free]" in text
    assert "--recon-batch INTEGER RANGE" in text and "[0<x<=1]" in text  # --capacity-alpha


def test_quantize_exposes_its_method_settings_in_its_own_words():
    text = _help("quantize")
    for flag in ("--iters", "--stop [fixed|plateau]", "--granularity", "--metaaug"):
        assert flag in text
    assert f"a ceiling under --stop plateau [at most {ONE_SHOT_ITERS['8-bit activations']} " in text
    assert "--merges" not in text and "--meta-iters" not in text


def test_a_setting_the_method_lacks_names_the_methods_it_applies_to():
    with pytest.raises(UsageError, match=r"^--merges does not apply to --method mse \(it applies"):
        check_settings("mse", {"merges": 2})
    with pytest.raises(UsageError, match=r"--meta-iters does not apply to --method adaround"):
        check_settings("adaround", {"meta_iters": 2})
    check_settings("qdrop", {"seed": 1, "iters": 3, "metaaug": True})


def test_a_registered_settings_dataclass_is_all_a_new_method_needs(monkeypatch):
    _toy(monkeypatch)
    assert calibration_flags()["sharpness"].flag == "--sharpness"
    check_settings("toy", {"sharpness": 0.5})
    with pytest.raises(UsageError, match=r"--sharpness does not apply to --method mse \(it "):
        check_settings("mse", {"sharpness": 0.5})
    with pytest.raises(UsageError, match="--iters does not apply to --method toy"):
        check_settings("toy", {"iters": 3})


def test_the_reconstruction_capability_is_declared():
    recon = {n for n, m in CALIBRATION_METHODS.items() if m.capabilities.reconstructs}
    assert recon == {"adaround", "adaquant", "brecq", "qdrop"}
    assert all(m.capabilities.data_free_ok for m in CALIBRATION_METHODS.values())


def test_plot_asks_the_capability_not_the_settings(monkeypatch, tmp_path: Path):
    from qcli.stages.calibrate import CalibrateConfig, calibrate
    from qcli.stages.common import DataOptions, ModelOptions
    from qcli.ui import UI

    _toy(monkeypatch)
    cfg = CalibrateConfig(
        ModelOptions("builtin:resnet20_cifar10"),
        DataOptions(tmp_path),
        tmp_path / "o.qcli",
        method="toy",
        plot=tmp_path / "p.png",
    )
    with pytest.raises(UsageError, match="--method toy has none"):
        calibrate(cfg, UI())


def test_quantize_refuses_generated_images_for_a_method_that_needs_real_ones(
    monkeypatch, tmp_path: Path
):
    from qcli.stages.common import ModelOptions
    from qcli.stages.quantize import QuantizeConfig, quantize
    from qcli.ui import UI

    _toy(monkeypatch, caps=Capabilities(data_free_ok=False))
    cfg = QuantizeConfig(ModelOptions("builtin:resnet20_cifar10"), tmp_path / "q", method="toy")
    with pytest.raises(UsageError, match="--method toy needs real calibration images"):
        quantize(cfg, UI())
    assert not (tmp_path / "q").exists()


def test_a_method_that_reads_labels_refuses_unlabelled_images(
    monkeypatch, tmp_path: Path, weights: Path
):
    import numpy as np
    from PIL import Image

    from qcli.stages.calibrate import CalibrateConfig, calibrate
    from qcli.stages.common import DataOptions, ModelOptions
    from qcli.ui import UI

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(flat / f"{i}.png")
    _toy(monkeypatch, caps=Capabilities(needs_labels=True))
    cfg = CalibrateConfig(
        ModelOptions("builtin:resnet20_cifar10", str(weights)),
        DataOptions(flat),
        tmp_path / "o.qcli",
        method="toy",
    )
    with pytest.raises(UsageError, match="--method toy reads the images' labels"):
        calibrate(cfg, UI())


def test_a_new_method_does_not_change_quantizes_default(monkeypatch):
    widths = ((8, 8), (4, 8), (4, 4), (8, 4))
    before = {(b, free): default_method(BitConfig(*b), free) for b in widths for free in (0, 1)}
    assert {b: before[b, 0] for b in widths} == {
        (8, 8): "mse", (4, 8): "qdrop", (4, 4): "brecq", (8, 4): "brecq"
    }  # fmt: skip
    assert {b: before[b, 1] for b in widths} == {
        (8, 8): "mse", (4, 8): "qdrop", (4, 4): "qdrop", (8, 4): "qdrop"
    }  # fmt: skip
    assert set(DEFAULT_METHOD.values()) <= set(CALIBRATION_METHODS)
    # a method registered later, even one that reconstructs, is never picked by default
    _toy(monkeypatch, "zzz-best", Capabilities(reconstructs=True))
    assert {(b, f): default_method(BitConfig(*b), f) for b, f in before} == before


def test_quantize_defaults_are_the_ones_its_benchmark_ranked_first():
    """`quantize`'s method per width and data is the first of benchmarks/one_shot.py's ranking
    (mean drop over both benchmark models), and its effort per width the one those rows ran
    with: change either, rerun the rows."""
    from conftest import REPO
    from qcli.stages.quantize import one_shot_effort, width_class

    payload = json.loads((REPO / "benchmarks" / "results" / "one_shot.json").read_text())
    ranking = payload["ranking"]
    # the two widths below 8 bits it ranks, with real and with generated images
    assert set(ranking) == {"4 real", "4 free", "w4a4 real", "w4a4 free"}
    for key, r in ranking.items():
        bits, data = key.split()
        cls = width_class(BitConfig.parse(bits))
        chosen = DEFAULT_METHOD[cls, "real" if data == "real" else "data-free"]
        # a method qcli refused on a model (its export gate) ranks after those it did not
        ranked = sorted(r["mean_drop"], key=lambda m: (m in r["refused"], -r["mean_drop"][m]))
        assert chosen == r["default"] == ranked[0], key
        assert set(r["cells"]) == {"effl0", "r20"}, key  # both models ranked
        assert payload["effort"][bits] == one_shot_effort(BitConfig.parse(bits))


def test_quantize_plans_the_input_width_its_benchmark_measured_better():
    """Below 8-bit activations `quantize` keeps the model input at 8 bits exactly where
    benchmarks/one_shot.py measured that a gain over both models: change it, rerun the rows."""
    from conftest import REPO
    from qcli.stages.quantize import one_shot_input_bits

    payload = json.loads((REPO / "benchmarks" / "results" / "one_shot.json").read_text())
    w4a4 = BitConfig.parse("w4a4")
    for data, verdict in payload["input_bits"].items():
        # measured on both ranked models, or refused on one (then it ranks last)
        assert set(verdict["gain"]) | set(verdict["refused"]) == {"effl0", "r20"}, data
        planned = one_shot_input_bits(w4a4, None, data_free=data == "free")
        assert planned == verdict["default"], data
        assert one_shot_input_bits(BitConfig.parse("w4a8"), None, data == "free") is None
    assert one_shot_input_bits(w4a4, 4, data_free=False) == 4  # as the user gives it


def test_registry_loads_every_method():
    registry.load_all()
    assert {"minmax", "percentile", "mse", "adaround", "adaquant", "brecq", "qdrop"} <= set(
        CALIBRATION_METHODS
    )


def test_generator_flags_come_from_their_settings_dataclass_too():
    from qcli.methods.registry import data_flags
    from qcli.stages.common import ModelOptions
    from qcli.stages.generate_data import GenerateConfig, method_settings

    flags = data_flags()
    assert flags["aggregate"].flag == "--no-aggregate" and flags["aggregate"].sets is False
    assert flags["schedule"].flag == "--lr-schedule"
    text = _help("generate-data")
    for flag in flags.values():
        assert flag.flag in text and " ".join(flag.help.split()) in text, flag.flag
    # a switch gives its field the value it declares; a field the generator lacks is refused
    args = ["builtin:resnet20_cifar10", "--method", "noise", "--zoom", "0.1", "--out", "unused"]
    result = CliRunner().invoke(cli, ["generate-data", *args])
    assert result.exit_code == 2 and "--zoom does not apply to --method noise" in result.stderr
    cfg = GenerateConfig(ModelOptions(), Path("x"), "dgh", options={"aggregate": False})
    assert method_settings(cfg).aggregate is False
