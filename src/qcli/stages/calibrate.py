"""`qcli calibrate`: model + calibration data -> quantized-model folder (.qcli)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qcli.artifacts import prepare_output
from qcli.artifacts.atomic import check_output_path
from qcli.artifacts.plot import write_loss_plot
from qcli.errors import QcliError, UsageError
from qcli.methods.chain import float_twin
from qcli.methods.int8_range import (
    WidenSettings,
    apply_widened,
    narrowed_layers,
    widen_sensitive_layers,
)
from qcli.methods.range_setting import fit_bias_grids
from qcli.methods.registry import CALIBRATION_METHODS, check_settings
from qcli.quant.capture import QuantGraph, capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from qcli.stages.common import (
    DataOptions,
    ModelOptions,
    device,
    image_batches,
    open_dataset,
    report_skipped,
    require_python_module,
    save_qmodel,
)
from qcli.ui import UI


@dataclass(frozen=True)
class CalibrateConfig:
    model: ModelOptions
    data: DataOptions
    out: Path
    bits: BitConfig = field(default_factory=lambda: BitConfig(8, 8))
    method: str = "mse"
    keep_fp: tuple[str, ...] = ()
    seed: int = 0
    force: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # method settings (--iters, ...)
    bn_tune: bool = False
    bias_tune: bool = False
    int8_range: str = "safe"  # 'full': the whole int8 weight grid, exact only where VNNI/ARM
    plan: QuantPlan | None = None  # a whole plan; then bits/keep_fp/int8_range unused
    bit_config: Path | None = None  # a bits.json (allocate-bits) holding the plan
    plot: Path | None = None  # PNG of the per-unit reconstruction loss along depth
    widen_share: float | None = None  # safe range: MACs that may widen back (None: default)
    strict: bool = False  # an op without an integer kernel is an error, not left in float
    input_bits: int | None = None  # the model input's bits over the plan's (None: the plan's)

    def quant_plan(self) -> QuantPlan:
        """The one plan capture receives: the given one, bits.json's, else the flags'; with
        `input_bits` when given."""
        if self.plan is not None:
            plan = self.plan
        elif self.bit_config is not None:
            from qcli.stages.allocate import read_plan

            plan = read_plan(self.bit_config)
        else:
            plan = QuantPlan.uniform(self.bits, self.keep_fp, self.int8_range)
        return plan if self.input_bits is None else replace(plan, input_bits=self.input_bits)


def calibrate(cfg: CalibrateConfig, ui: UI) -> dict[str, Any]:
    check_settings(cfg.method, cfg.settings)  # a flag the method does not read is refused
    plan = cfg.quant_plan()  # a bad bits.json fails before anything is written
    inputs = {**cfg.data.input_files(), **cfg.model.input_files(), "--bit-config": cfg.bit_config}
    if cfg.plot is not None:
        if not CALIBRATION_METHODS[cfg.method].capabilities.reconstructs:
            raise UsageError(f"--plot shows reconstruction losses; --method {cfg.method} has none")
        check_output_path(cfg.plot, "--plot", {**inputs, "--out": cfg.out})
    prepare_output(cfg.out, cfg.force, inputs=inputs)
    torch.manual_seed(cfg.seed)
    loaded = cfg.model.load(ui)
    require_python_module(loaded, "calibrate")
    ds = open_dataset(cfg.data, loaded.input_spec, cfg.seed)
    if CALIBRATION_METHODS[cfg.method].capabilities.needs_labels and not ds.labelled:
        raise UsageError(
            f"--method {cfg.method} reads the images' labels: give --data a labelled folder "
            "(DIR/<class>/<image>)"
        )
    qg = capture(loaded.module, (3, *loaded.input_spec.size), plan)
    op_report = check_float_ops(qg, cfg.strict, ui)
    qg.to(device())
    settings = {"seed": cfg.seed, **cfg.settings}
    if settings.get("metaaug"):  # T's output stays within the valid pixel range
        settings["input_norm"] = {k: list(getattr(loaded.input_spec, k)) for k in ("mean", "std")}
    bs = cfg.data.batch_size
    bn_tune = cfg.bn_tune and qg.batchnorm_layers > 0
    if cfg.bn_tune and not bn_tune:
        ui.warn(NO_BATCHNORM)
    # Tuning needs every image in memory after the method: decode them once for both.
    tune = bn_tune or cfg.bias_tune
    images = torch.cat(list(image_batches(ds, bs))) if tune else None
    reference = float_twin(qg) if tune else None
    batches = images.split(bs) if images is not None else image_batches(ds, bs)
    metrics = run_method(qg, cfg.method, batches, len(ds), settings, ui)
    if "mrecg" in metrics.get("reconstruction", {}):
        _decision_table(metrics["reconstruction"]["mrecg"], ui)
    if narrowed_layers(qg):
        probe = (
            images if images is not None else next(image_batches(ds, WidenSettings.probe_images))
        )
        with ui.task("int8 range: widen sensitive layers", total=None):
            metrics["int8_range"] = widen(qg, probe, cfg.method, cfg.widen_share)
    if images is not None:
        metrics["tuning"] = run_tuning(qg, reference, images, cfg, ui, bn_tune)
    if cfg.bn_tune and not bn_tune:
        metrics["tuning"] = {**metrics.get("tuning", {}), "bn_tune_skipped": NO_BATCHNORM}
    _unit_table(metrics, ui)
    if cfg.plot is not None:
        write_loss_plot(cfg.plot, metrics["reconstruction"]["oscillation"], _plot_title(cfg, qg))
        metrics["plot"] = str(cfg.plot)
    skipped = report_skipped(ds, ui)
    qg.to("cpu")
    extra = {
        "method": {
            "name": cfg.method,
            "settings": settings,
            "bn_tune": cfg.bn_tune,
            "bias_tune": cfg.bias_tune,
        },
        "calibration": {
            "data": os.path.abspath(cfg.data.path),
            "images": metrics.get("images"),
            "skipped": skipped,
            "seed": cfg.seed,
            "seconds": metrics.get("seconds"),
        },
        "metrics": metrics,
        "ops": op_report,
    }
    save_qmodel(cfg.out, qg, loaded, extra, cfg.force)
    return {
        "out": str(cfg.out),
        "model": loaded.name,
        "bits": qg.base_plan.describe(),
        "method": cfg.method,
        "layers": sum(1 for _ in qg.layers()),
        "activation_quantizers": sum(1 for _ in qg.act_quantizers()),
        "ops": op_report,
        **{k: v for k, v in metrics.items() if k != "range_method"},
    }


def describe_ops(report: dict[str, Any]) -> str:
    """One line on what runs where: "100 of 149 compute ops in integer kernels; float:
    layer_norm ×25, gelu ×12"."""
    line = f"{report['integer_ops']} of {report['compute_ops']} compute ops in integer kernels"
    if report["float_ops"]:
        line += "; float: " + ", ".join(f"{k} ×{v}" for k, v in report["float_ops"].items())
    if report["float_leaves"]:
        line += f" (fx could not trace {', '.join(report['float_leaves'])}: run as float)"
    return line


def check_float_ops(qg: QuantGraph, strict: bool, ui: UI) -> dict[str, Any]:
    """Say which ops run in float between DequantizeLinear and QuantizeLinear; under
    `strict` any such op is an error, for users who need an integer-only graph."""
    report = qg.op_report()
    if strict and report["float_nodes"]:
        raise QcliError(
            f"--strict: {len(report['float_nodes'])} ops have no integer kernel and would run "
            f"in float, first {report['float_nodes'][0]} ({describe_ops(report)})"
        )
    if report["float_nodes"]:
        ui.info(describe_ops(report) + " (see --show-float)")
    return report


def show_float_of(cfg: CalibrateConfig, ui: UI) -> dict[str, Any]:
    """The ops that would run in float, by layer, without calibrating (no data needed)."""
    loaded = cfg.model.load(ui)
    require_python_module(loaded, "calibrate")
    qg = capture(loaded.module, (3, *loaded.input_spec.size), cfg.quant_plan())
    report = qg.op_report()
    ui.table(
        f"float ops of {loaded.name}",
        ["node", "op"],
        [node.rsplit(": ", 1) for node in report["float_nodes"]],
    )
    return {"model": loaded.name, "ops": report, "summary": describe_ops(report)}


def run_method(
    qg: QuantGraph,
    method: str,
    batches: Iterable[torch.Tensor],
    n_images: int,
    settings: dict[str, Any],
    ui: UI,
) -> dict[str, Any]:
    """Run one registered calibration method on the calibration batches, with a progress bar."""
    m = CALIBRATION_METHODS[method]
    total = m.total(qg, n_images, settings) if m.total else n_images
    start = time.perf_counter()
    with ui.task(f"calibrate ({method})", total=total) as advance:
        metrics = m.run(qg, batches, settings, advance)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics


def widen(
    qg: QuantGraph, images: torch.Tensor, method: str, share: float | None = None
) -> dict[str, Any]:
    """The saturation-safe range's second step: widen the layers that need the full grid,
    with the method's own weight estimator (MSE unless it sets plain ranges), within `share`
    of the multiply-adds (None: `WidenSettings`' default); the chosen plan is applied
    through the grid resolver."""
    weight_method = "minmax" if method in ("minmax", "percentile") else "mse"
    settings = WidenSettings() if share is None else WidenSettings(mac_share=share)
    plan, report = widen_sensitive_layers(qg, images, weight_method, settings)
    apply_widened(qg, plan, weight_method)
    fit_bias_grids(qg)
    return report


NO_BATCHNORM = (
    "BN tuning skipped: the model has no BatchNorm layers, so there are no running statistics "
    "to match (LayerNorm keeps none)"
)


def run_tuning(
    qg: QuantGraph,
    reference: QuantGraph,
    images: torch.Tensor,
    cfg: CalibrateConfig,
    ui: UI,
    bn_tune: bool,
) -> dict[str, Any]:
    """BN tuning, then bias tuning, on the calibration images; biases then refit int32."""
    from qcli.methods.tuning import tune_statistics

    done: dict[str, Any] = {}
    start = time.perf_counter()
    for flag, match_std, on in (("bn_tune", True, bn_tune), ("bias_tune", False, cfg.bias_tune)):
        if on:
            with ui.task(flag.replace("_", " "), total=None) as advance:
                done[f"{flag}_layers"] = tune_statistics(
                    qg, reference, images, match_std, cfg.data.batch_size, advance
                )
    fit_bias_grids(qg)
    done["seconds"] = round(time.perf_counter() - start, 2)
    return done


def show_units_of(cfg: CalibrateConfig, granularity: str | None, ui: UI) -> dict[str, Any]:
    """The units a reconstruction method would tune, without tuning anything (MRECG with the
    loss capacity runs its short base pass, so it needs --data)."""
    from qcli.methods import mrecg, recipes
    from qcli.methods import reconstruction as engine

    check_settings(cfg.method, cfg.settings)
    recon = cfg.method in recipes.RECIPES
    r = recipes.prepare(cfg.method, {"seed": cfg.seed, **cfg.settings}) if recon else None
    loaded = cfg.model.load(ui)
    require_python_module(loaded, "reconstruct")
    qg = capture(loaded.module, (3, *loaded.input_spec.size), cfg.quant_plan())
    g = granularity or (r.granularity if r is not None else "block")
    if r is None or r.mrecg is None:
        units = engine.describe_units(qg, g)
        _units_table(f"{g} units of {loaded.name}", units, ui)
        return {"model": loaded.name, "granularity": g, "units": units}
    images = None
    if r.mrecg.kind != "data-free" and cfg.data is not None:
        qg.to(device())
        ds = open_dataset(cfg.data, loaded.input_spec, cfg.seed)
        images = torch.cat(list(image_batches(ds, cfg.data.batch_size)))
        engine.init_ranges(qg, images, r.engine)
    with ui.task("MRECG: choose the merges", total=None):
        choice = mrecg.choose_plan(qg, r.engine, r.mrecg, images)
    units = engine.describe_units(qg, choice.plan)
    _units_table(f"mrecg units of {loaded.name}", units, ui)
    decision = choice.decision.to_dict()
    _decision_table(decision, ui)
    return {"model": loaded.name, "granularity": g, "units": units, "mrecg": decision}


def _units_table(title: str, units: list[dict[str, Any]], ui: UI) -> None:
    rows = [
        (i, u["unit"], u["layers"], "x".join(map(str, u["output"] or [])))
        for i, u in enumerate(units)
    ]
    ui.table(title, ["#", "unit", "layers", "output"], rows)


def _decision_table(d: dict[str, Any], ui: UI) -> None:
    """Every block with its capacity value and the gap to the next one, merges marked."""
    group_of = {i: "+".join(map(str, g)) for g in d["groups"] for i in g}
    value = "ModCap" if d["capacity"] == "data-free" else "base loss"
    rows = [
        (
            i,
            name,
            f"{d['values'][i]:.6g}",
            f"{d['gaps'][i]:.6g}" if i < len(d["gaps"]) else "",
            group_of.get(i, ""),
        )
        for i, name in enumerate(d["units"])
    ]
    title = f"MRECG {d['capacity']} capacity: {d['merges']} merges of the largest gaps"
    ui.table(title, ["#", "block", value, "gap to next", "merged"], rows)


def _plot_title(cfg: CalibrateConfig, qg: QuantGraph) -> str:
    g = cfg.settings.get("granularity", "")
    return f"{cfg.model.spec} {qg.base_plan.describe()} {cfg.method} {g}".strip()


def _unit_table(metrics: dict[str, Any], ui: UI) -> None:
    units = metrics.get("reconstruction", {}).get("units", [])
    if units:
        rows = [
            (u["name"], u["layers"], u["loss_before"], u["loss_after"], round(u["seconds"], 1))
            for u in units
        ]
        ui.table("reconstruction loss per unit", ["unit", "layers", "before", "after", "s"], rows)
