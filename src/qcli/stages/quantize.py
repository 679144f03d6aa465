"""`qcli quantize`: the whole chain with good defaults, data-free when no data is given.

generate data (if none) -> calibrate -> export -> evaluate against the float model. Every
artifact lands in one output folder, which is built beside the target and swapped in at the
end, so an interrupted run leaves the previous output intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qcli.artifacts import atomic_dir, prepare_output
from qcli.artifacts.atomic import write_manifest
from qcli.errors import QcliError, UsageError
from qcli.evaluate import OrtModel, file_size, latency
from qcli.export.float_onnx import write_float_onnx
from qcli.methods.generators.bn_stats import NoBatchNormError
from qcli.methods.registry import calibration_method, check_settings
from qcli.quant.capture import QuantGraph
from qcli.quant.spec import BitConfig
from qcli.stages.allocate import AllocateConfig, BudgetRequest, allocate_bits, read_bits
from qcli.stages.calibrate import CalibrateConfig, calibrate
from qcli.stages.common import DataOptions, ModelOptions, QModel, load_qmodel
from qcli.stages.evaluate import EvalConfig, evaluate
from qcli.stages.export import ExportConfig, export
from qcli.stages.generate_data import GenerateConfig, generate
from qcli.ui import UI


@dataclass(frozen=True)
class QuantizeConfig:
    model: ModelOptions
    out: Path
    bits: BitConfig = field(default_factory=lambda: BitConfig(8, 8))
    data: DataOptions | None = None
    eval_data: DataOptions | None = None
    method: str | None = None  # None: DEFAULT_METHOD for the width and data
    # The data-free preset keeps `make demo` (EfficientNet-Lite0, 2 cores) within minutes:
    # 32 images in one batch (the set's statistics are the batch's: no cached moments to
    # refresh, ~30% of a step), 50 iterations, DGH with Adam at lr 0.15 (GEN_PRESETS).
    # Measured on EfficientNet-Lite0, one thread, in one run: set BN loss 1.16 in 175 s,
    # against 3.21 in 171 s for MCT's RAdam at lr 16 in two batches of 16 (the former
    # preset); half the iterations at half resolution reached 1.87 in 106 s, 80 such
    # iterations 1.14 in 172 s (no gain at equal time). See benchmarks/mct.md.
    gen_method: str = "dgh"
    gen_images: int = 32
    gen_iters: int = 50
    gen_batch_size: int = 32
    seed: int = 0
    force: bool = False
    latency: bool = True
    iters: int | None = None  # reconstruction iterations per unit; a ceiling under "plateau"
    stop: str | None = None  # reconstruction effort mode (None: see `method_settings`)
    granularity: str | None = None  # reconstruction unit, e.g. "mrecg" (None: the method's)
    # BN tuning on at every width: on effl0 it lifts W8A8 too (real data 87.75 -> 89.00,
    # benchmarks/ptq.md; data-free 87.875 -> 88.125 over two seeds), r20 W8A8 80.97 -> 81.05.
    bn_tune: bool = True
    int8_range: str = "safe"
    widen_share: float | None = None  # safe range: MACs that may widen back (None: default)
    weight_storage: str = "int8"  # int8 runs in integer kernels; int4 is smaller but slower
    # "mixed": the size of uniform `bits.weight` weights is a budget that allocate-bits fills
    # with MIXED_WIDTHS per layer (activations stay at bits.activation), then that plan is
    # calibrated; "uniform": every layer at `bits.weight`. None: mixed below 8-bit weights
    # (the 4-bit size filled by the allocation: +5.4 points over uniform W4A8 on effl0, issue
    # 25), uniform at 8 (the widest candidate: nothing to allocate).
    precision: str | None = None
    metaaug: bool = False  # MetaAug on top of the (reconstruction) method
    strict: bool = False  # refuse a model with ops that have no integer kernel
    input_bits: int | None = None  # the model input's quantizer (None: `one_shot_input_bits`)

    @property
    def mixed(self) -> bool:
        return is_mixed(self.bits, self.precision)


# Below 8 bits without --mixed/--uniform, the allocated plan is used only when it predicts at
# most this share of uniform weights' summed KL. Measured (benchmarks/quantize-mixed.md): on
# EfficientNet-Lite0 W4A8 the allocation predicts 0.10 of uniform's KL and gains 4.5 points
# after QDrop (87.25 against 82.75); on ResNet-20 it predicts 0.51-0.74 and loses 0.8 at W4A4
# (77.88 against 78.69, 3 seeds) and 0.14 at W4A8: reconstruction recovers a mild uniform
# loss better than a few narrower layers. The threshold lies between the two models; on
# EfficientNet-Lite1, which it was not set on, the allocation predicts 0.11 and gains 4.75
# points (86.00 against 81.25, benchmarks/one_shot.md).
MIXED_MIN_GAIN = 0.25


def uniform_prediction(bits_json: Path, weight_bits: int) -> float:
    """Summed KL of every weight at `weight_bits`, from the sensitivities in bits.json."""
    units = read_bits(bits_json)["sensitivities"]["units"]
    return sum(u["kl"][u["bits"].index(weight_bits)] for u in units if u["kind"] == "weight")


def choose_plan(precision: str | None, mixed_kl: float, uniform_kl: float) -> str:
    """ "mixed" or "uniform": as asked, else mixed where it predicts a large gain."""
    if precision is not None:
        return precision
    return "mixed" if mixed_kl <= MIXED_MIN_GAIN * uniform_kl else "uniform"


def is_mixed(bits: BitConfig, precision: str | None) -> bool:
    """Whether `quantize` runs the allocation: as asked, else below 8-bit weights (where
    `choose_plan` then keeps it only if it predicts a large gain)."""
    if precision is None:
        return bits.weight < max(MIXED_WIDTHS)
    return precision == "mixed"


MIXED_WIDTHS = (2, 3, 4, 8)
PRECISIONS = ("mixed", "uniform")
# The allocation's sensitivities inside `quantize`: the one-pass estimate. At the 4-bit size
# with MSE calibration of each plan (benchmarks/sensitivity.md): ResNet-20 gets the measured
# plan itself (78.23 both) in 31 s against 170 s; EfficientNet-Lite0 a plan one layer apart
# (83.0 against 83.5 on 400 images) in 74 s against 604 s.
MIXED_SENSITIVITY = "estimate"
# What noise images cost a model without BatchNorm: the trained builtin:vit_cifar10, W8A8
# MSE ranges, onnxruntime top-1 on the 10,000 cifar10/test images (benchmarks/vit_cifar10.md).
NOISE_COST = "W8A8 top-1 69.00 against 69.45 with 512 real images on a CIFAR-10 ViT"


# Short-budget settings per generator (RAdam's rectified warm-up spends most of a 50-step run
# at a fraction of its lr; Adam does not), on top of the generator's own defaults.
GEN_PRESETS: dict[str, dict[str, Any]] = {"dgh": {"optimizer": "adam", "lr": 0.15}}


# The one-shot command's reconstruction effort, per width class (`width_class`): at most
# ONE_SHOT_ITERS iterations per unit within a compute budget of 80 billion activation elements.
# The budget caps EfficientNet-Lite0 at 97 (~10 minutes on 2 cores) whatever the ceiling; the
# ceiling bounds small models, whose steps are overhead-bound. Measured on ResNet-20 with 1,024
# images (benchmarks/one_shot.md, 3 seeds): at W4A4 BRECQ gains 0.68 from 500 to 2,000
# (79.82 against 79.14, ~10 minutes of one thread); at the 4-bit size with 8-bit activations
# QDrop loses 0.30 (80.50 against 80.80; lower on two seeds, equal on the third), so the
# ceiling stays 500 there. On generated images units stop when their loss stops improving:
# they overfit the few synthetic images sooner (ResNet-20 W4A4 data-free 77.90 with the plateau
# stop against 77.19 fixed, benchmarks/effort-r20.md), while real images gain from every step.
ONE_SHOT_ITERS = {"8 bits": 500, "8-bit activations": 500, "narrow activations": 2000}
ONE_SHOT_BUDGET = 80.0


# The model input's bits below 8-bit activations, per calibration data (None: the activation
# width). The papers keep their first layer at 8 bits, and onnxruntime's kernel reads a uint8
# image at no extra cost. Measured (benchmarks/one_shot.md, --input-bits 8 against the rows at
# the activation width): with real images EfficientNet-Lite0 W4A4 (QDrop, 100 images) 78.50
# against 74.25 and ResNet-20 W4A4 (BRECQ, 1,024 images) within seed noise (-0.94 and +0.81 on
# two seeds); on generated images ResNet-20 gained 0.41 (3 seeds, each ahead) but the export
# check refused EfficientNet-Lite0's file (onnxruntime's reference arithmetic flipped one of
# the 32 generated check images decisively).
ONE_SHOT_INPUT_BITS: dict[str, int | None] = {"real": 8, "data-free": None}


def one_shot_input_bits(bits: BitConfig, given: int | None, data_free: bool) -> int | None:
    """The model input's bits `quantize` plans: as given, else ONE_SHOT_INPUT_BITS below 8-bit
    activations (None: the activation width)."""
    if given is not None or bits.activation >= 8:
        return given
    return ONE_SHOT_INPUT_BITS["data-free" if data_free else "real"]


def one_shot_effort(bits: BitConfig) -> dict[str, Any]:
    """The iteration ceiling and compute budget `quantize` reconstructs with at `bits`."""
    return {"iters": ONE_SHOT_ITERS[width_class(bits)], "budget": ONE_SHOT_BUDGET}


def method_settings(method: str, cfg: QuantizeConfig) -> dict[str, Any]:
    """The calibration settings `quantize` passes on: the user's, over the one-shot effort
    where the method reconstructs (a flag the method does not read stays, to be refused)."""
    pairs = (("iters", cfg.iters), ("stop", cfg.stop), ("granularity", cfg.granularity))
    given = {k: v for k, v in pairs if v is not None}
    if cfg.metaaug:
        given["metaaug"] = True
    # an unknown method is named before its settings are looked up
    if not calibration_method(method).capabilities.reconstructs:
        return given
    effort = {**one_shot_effort(cfg.bits), "stop": "plateau" if cfg.data is None else "fixed"}
    if "iters" in given:  # iterations asked for are run, not cut to the budget
        del effort["budget"]
    return {**effort, **given}


# The default method per width class and calibration data (real: --data; data-free: generated
# images), chosen by measurement, not by a rank a newly registered method could change. At 8
# bits range setting (MSE) is within a point of float and takes seconds (benchmarks/ptq.md).
# Below, benchmarks/one_shot.md ranks the reconstruction methods per width and data by their
# mean drop over both benchmark models at the one-shot effort (tests pin this table to its
# JSON). With 8-bit activations QDrop leads with real and generated images alike (by 0.3 and 0.5
# points; on EfficientNet-Lite0's allocated plan by 0.9 and 1.25). At W4A4 the data decides: with
# real images BRECQ leads on ResNet-20 by 0.97 (79.82 against 78.85, 3 seeds, ahead on each, at
# 2,000 iterations per unit) and trails on EfficientNet-Lite0 by 0.50 (one seed); on generated
# images QDrop leads on ResNet-20 by 0.52 (77.88 against 77.36, 3 seeds); on EfficientNet-Lite0
# QDrop gives 71.00 and BRECQ's file is refused by the export check (onnxruntime's reference
# arithmetic flips 2 of 32 check images decisively).
DEFAULT_METHOD = {
    ("8 bits", "real"): "mse",
    ("8 bits", "data-free"): "mse",
    ("8-bit activations", "real"): "qdrop",
    ("8-bit activations", "data-free"): "qdrop",
    ("narrow activations", "real"): "brecq",
    ("narrow activations", "data-free"): "qdrop",
}
# The width classes, in words for `--method`'s help (`width_class` maps a width to its class).
WIDTH_CLASSES = {
    "8 bits": "at W8A8",
    "8-bit activations": "below 8-bit weights",
    "narrow activations": "below 8-bit activations",
}


def width_class(bits: BitConfig) -> str:
    """The width part of a `DEFAULT_METHOD` key."""
    if bits.activation < 8:
        return "narrow activations"
    return "8 bits" if bits.weight >= 8 else "8-bit activations"


def default_method(bits: BitConfig, data_free: bool) -> str:
    return DEFAULT_METHOD[width_class(bits), "data-free" if data_free else "real"]


def describe_default_method() -> str:
    """The table in words, for `--method`'s help."""
    parts = []
    for cls, where in WIDTH_CLASSES.items():
        real, free = DEFAULT_METHOD[cls, "real"], DEFAULT_METHOD[cls, "data-free"]
        parts.append(
            f"{real} {where}" if real == free else f"{where} {real} with --data, {free} without"
        )
    return ", ".join(parts)


def quantize(cfg: QuantizeConfig, ui: UI) -> dict[str, Any]:
    method = cfg.method or default_method(cfg.bits, data_free=cfg.data is None)
    settings = method_settings(method, cfg)
    check_settings(method, settings)
    caps = calibration_method(method).capabilities
    if cfg.data is None and (caps.needs_labels or not caps.data_free_ok):
        raise UsageError(f"--method {method} needs real calibration images: give --data DIR")
    inputs = {**cfg.model.input_files()}
    if cfg.data is not None:
        inputs |= cfg.data.input_files()
    if cfg.eval_data is not None:
        inputs |= cfg.eval_data.input_files("--eval-data")
    for flag, opts in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if opts is not None and not Path(opts.path).is_dir():
            raise QcliError(f"{flag} '{opts.path}' is not a folder")  # before minutes of work
    prepare_output(cfg.out, cfg.force, inputs=inputs)
    input_bits = one_shot_input_bits(cfg.bits, cfg.input_bits, data_free=cfg.data is None)
    widths = "" if input_bits is None else f", input {input_bits}-bit"
    summary: dict[str, Any] = {
        "model": cfg.model.spec,
        "bits": (f"mixed at the size of {cfg.bits}" if cfg.mixed else str(cfg.bits)) + widths,
        "method": method,
        "out": str(cfg.out),
    }
    with atomic_dir(cfg.out) as tmp:
        data = cfg.data
        if data is None:
            preset = GEN_PRESETS.get(cfg.gen_method, {})
            gen = _generate_or_explain(
                GenerateConfig(
                    cfg.model,
                    tmp / "calib-data",
                    cfg.gen_method,
                    cfg.gen_images,
                    min(cfg.gen_batch_size, cfg.gen_images),
                    cfg.gen_iters,
                    lr=preset.get("lr"),
                    seed=cfg.seed,
                    options={k: v for k, v in preset.items() if k != "lr"},
                ),
                ui,
            )
            summary["data_generation"] = gen
            data = DataOptions(tmp / "calib-data")
        qpath, opath = tmp / "model.qcli", tmp / "model.onnx"
        bit_config = None
        if cfg.mixed:
            bit_config, summary["allocate_bits"] = _allocate(cfg, data, tmp / "bits.json", ui)
            if bit_config is None:
                summary["bits"] = str(cfg.bits) + widths
        summary["calibrate"] = calibrate(
            CalibrateConfig(
                cfg.model,
                data,
                qpath,
                cfg.bits,
                method,
                seed=cfg.seed,
                settings=settings,
                bn_tune=cfg.bn_tune,
                int8_range=cfg.int8_range,
                bit_config=bit_config,
                widen_share=cfg.widen_share,
                strict=cfg.strict,
                input_bits=input_bits,
            ),
            ui,
        )
        summary["export"] = export(
            ExportConfig(qpath, opath, check_data=data.path, weight_storage=cfg.weight_storage),
            ui,
        )
        eval_data = cfg.eval_data or data
        summary["eval_data"] = (
            str(eval_data.path)
            if cfg.eval_data or cfg.data
            else "calibration images (no --data given)"
        )
        summary["eval_fp"] = evaluate(
            EvalConfig(cfg.model.spec, eval_data, model=cfg.model, latency=False, seed=cfg.seed),
            ui,
        )
        summary["eval_quantized"] = evaluate(
            EvalConfig(
                str(opath),
                eval_data,
                reference=cfg.model.spec,
                model=cfg.model,
                latency=False,
                seed=cfg.seed,
            ),
            ui,
        )
        qm = load_qmodel(qpath)  # once, for the plan and the float file
        alloc = summary.get("allocate_bits")
        summary["plan"] = plan_summary(
            qm.graph, alloc if alloc and alloc["chosen"] == "mixed" else None
        )
        summary["deployment"] = _float_vs_int8(qm, opath, cfg.latency, ui)
        # Paths recorded so far point into the temporary folder: name the final one instead.
        _relocate(summary, tmp, cfg.out)
        write_manifest(tmp / "summary.json", summary)
        manifest = json.loads((qpath / "manifest.json").read_text())
        _relocate(manifest, tmp, cfg.out)
        write_manifest(qpath / "manifest.json", manifest)
    return summary


def _allocate(
    cfg: QuantizeConfig, data: DataOptions, out: Path, ui: UI
) -> tuple[Path | None, dict[str, Any]]:
    """allocate-bits at the size of uniform `cfg.bits.weight` weights; returns the bits.json
    to calibrate (None: the uniform plan, where the allocation predicts too little gain)."""
    alloc = allocate_bits(
        AllocateConfig(
            cfg.model,
            data,
            out,
            BudgetRequest("size", weight_bits=cfg.bits.weight),
            tuple(sorted({*MIXED_WIDTHS, cfg.bits.weight})),
            (cfg.bits.activation,),
            int8_range=cfg.int8_range,
            sensitivity=MIXED_SENSITIVITY,
            verify=False,
            seed=cfg.seed,
        ),
        ui,
    )
    mixed_kl = alloc["predicted_degradation"]
    uniform_kl = uniform_prediction(out, cfg.bits.weight)
    alloc["uniform_predicted_degradation"] = uniform_kl
    alloc["chosen"] = choose_plan(cfg.precision, mixed_kl, uniform_kl)
    if alloc["chosen"] == "mixed":
        return out, alloc
    ui.info(
        f"uniform {cfg.bits}: the allocation predicts {mixed_kl:.3g} nats against "
        f"{uniform_kl:.3g} for uniform weights, less than {1 / MIXED_MIN_GAIN:.0f}x better "
        "(--mixed uses it anyway)"
    )
    return None, alloc


def layer_kind(layer: nn.Module, position: str) -> str:
    """What a user calls a layer when reading a plan: stem (the first), classifier (the last
    linear), depthwise, pointwise, conv kxk, linear."""
    if isinstance(layer, nn.Linear):
        return "classifier" if position == "last" else "linear"
    if position == "first":
        return "stem"
    if layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels:
        return "depthwise"
    k = "x".join(map(str, layer.kernel_size))
    return "pointwise" if k == "1x1" else f"conv {k}"


def plan_summary(qg: QuantGraph, allocation: dict[str, Any] | None) -> dict[str, Any]:
    """The plan as the file holds it: quantized layers per kind and weight width (kept-float
    ones as 32), their packed weight bytes, and for a mixed plan the budget it was allocated
    under and the degradation it predicted (summed KL, nats)."""
    layers = list(qg.layers())
    kinds: dict[str, dict[int, int]] = {}
    size = 0.0
    for i, (_, layer) in enumerate(layers):
        position = "first" if i == 0 else "last" if i == len(layers) - 1 else ""
        wq = layer.weight_quantizer
        bits = wq.spec.bits if wq is not None else 32
        per = kinds.setdefault(layer_kind(layer, position), {})
        per[bits] = per.get(bits, 0) + 1
        if wq is not None:
            size += layer.weight.numel() * bits / 8
    out: dict[str, Any] = {
        "weights": {k: dict(sorted(v.items())) for k, v in kinds.items()},
        "weight_bytes": int(size),
    }
    if allocation is not None:
        out["budget_bytes"] = int(allocation["budget"]["value"])
        out["predicted_kl"] = allocation.get("predicted_degradation")
    return out


def _float_vs_int8(qm: QModel, opath: Path, measure_latency: bool, ui: UI) -> dict[str, Any]:
    """The float model and the quantized file side by side as a user deploys them: both as
    ONNX in the same onnxruntime, sizes and latency measured in one run (the float file is
    written to a scratch folder and not kept)."""
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = write_float_onnx(qm.graph, Path(scratch) / "float.onnx")
        report: dict[str, Any] = {
            "fp32_onnx_bytes": file_size(fp32),
            "int8_onnx_bytes": file_size(opath),
        }
        if measure_latency:
            shape = (3, *qm.input_spec.size)
            with ui.task("latency: onnxruntime FP32 and INT8", total=None):
                report["latency_ms"] = {
                    name: {b: round(st.median * 1000, 3) for b, st in latency(m, shape).items()}
                    for name, m in (("fp32", OrtModel(fp32)), ("int8", OrtModel(opath)))
                }
    return report


def _generate_or_explain(gen_cfg: GenerateConfig, ui: UI) -> dict[str, Any]:
    """Data-free calibration images, or one sentence on what works for a model without
    BatchNorm statistics, in `quantize`'s own flags."""
    try:
        return generate(gen_cfg, ui)
    except NoBatchNormError as e:
        raise UsageError(
            f"{gen_cfg.model.spec} has no BatchNorm layers, so --gen-method {gen_cfg.method} "
            "cannot generate calibration images from it: pass real images with --data DIR "
            "(best), or use --gen-method noise (random images: activation ranges only; "
            f"measured: {NOISE_COST})"
        ) from e


def _relocate(obj: Any, old: Path, new: Path) -> None:
    """Rewrite, in place, every string path under `old` to lie under `new` (as typed, and
    absolute: stages record some paths absolute)."""
    pairs = [(str(old), str(new)), (os.path.abspath(old), os.path.abspath(new))]
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str):
                for a, b in pairs:
                    if v == a or v.startswith(a + os.sep):
                        obj[k] = b + v[len(a) :]
                        break
            else:
                _relocate(v, old, new)
