"""The command line: parse flags into a config, call one stage, print the result.

Exit codes: 0 success, 1 the run failed (QcliError), 2 bad usage (UsageError, Click's own
usage errors). No traceback reaches the user unless QCLI_DEBUG=1.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qcli import __version__, distributed
from qcli.errors import QcliError, UsageError
from qcli.export.onnx_qdq import WEIGHT_STORAGES
from qcli.methods.bit_allocation import SOLVERS
from qcli.methods.coreset import CORESETS
from qcli.methods.qat import OPTIMIZERS as QAT_OPTIMIZERS
from qcli.methods.registry import (
    CALIBRATION_METHODS,
    DATA_METHODS,
    Flag,
    calibration_flags,
    data_flags,
    load_all,
)
from qcli.methods.sensitivity import SENSITIVITY_MODES
from qcli.quant.grid import narrowing_blocker
from qcli.quant.spec import INT8_RANGES, MAX_BITS, MIN_BITS, BitConfig
from qcli.stages.common import DEFAULT_MODEL, DataOptions, ModelOptions, dump_json
from qcli.stages.evaluate import SIMULATIONS
from qcli.stages.quantize import ONE_SHOT_INPUT_BITS, ONE_SHOT_ITERS, describe_default_method
from qcli.ui import RichUI

load_all()


class PathArg(click.Path):
    """click.Path that refuses an empty value: Path("") is ".", which would silently read (or
    with --force replace) the working folder."""

    def convert(self, value: Any, param, ctx) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; name a file or folder", param, ctx)
        return super().convert(value, param, ctx)


MAX_IMAGE_SIZE = 4096  # 32 images of 4096² already take 6 GB as float32


class BitsType(click.ParamType):
    name = "BITS"

    def convert(self, value: Any, param, ctx) -> BitConfig:
        if isinstance(value, BitConfig):
            return value
        try:
            return BitConfig.parse(str(value))
        except UsageError as e:
            self.fail(str(e).removeprefix("--bits: "), param, ctx)


class CommaList(click.ParamType):
    """A comma-separated list ("a, b,,c" -> ("a", "b", "c")): --keep-fp is parsed here, once
    for every command."""

    name = "TEXT"

    def convert(self, value: Any, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(k.strip() for k in str(value).split(",") if k.strip())


def _floats3(ctx, param, value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter("give three comma-separated numbers, e.g. 0.5,0.5,0.5")
    return parts


def model_options(fn: Callable) -> Callable:
    """--weights, --arch, --trust-pickle and input overrides: everything that completes MODEL."""
    opts = [
        click.option(
            "--weights",
            type=PathArg(dir_okay=False),
            help="Weights file (state dict) for builtin:/timm:/torchvision: models.",
        ),
        click.option("--arch", help="Architecture (a MODEL spec) for a state-dict file."),
        click.option(
            "--trust-pickle",
            is_flag=True,
            help="Allow loading a pickled module (unpickling runs code).",
        ),
        click.option(
            "--num-classes",
            type=click.IntRange(min=1),
            help="Classifier size for timm:/torchvision: models.",
        ),
        click.option(
            "--image-size",
            type=click.IntRange(min=8, max=MAX_IMAGE_SIZE),
            help="Override the model's input size.",
        ),
        click.option(
            "--mean", callback=_floats3, help="Override normalization mean, e.g. 0.5,0.5,0.5."
        ),
        click.option("--std", callback=_floats3, help="Override normalization std."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _model(spec: str, kw: dict) -> ModelOptions:
    overrides = {k: kw.pop(k) for k in ("image_size", "mean", "std")}
    overrides = {
        ("size" if k == "image_size" else k): v for k, v in overrides.items() if v is not None
    }
    return ModelOptions(
        spec=spec,
        weights=kw.pop("weights"),
        arch=kw.pop("arch"),
        trust_pickle=kw.pop("trust_pickle"),
        num_classes=kw.pop("num_classes"),
        input_overrides=overrides,
    )


def data_options(required: bool) -> Callable:
    def wrap(fn: Callable) -> Callable:
        opts = [
            click.option(
                "--data",
                "data_path",
                type=PathArg(path_type=Path),
                required=required,
                help="Image folder (ImageFolder layout or flat) or a qcli data-set folder.",
            ),
            click.option(
                "--class-list",
                type=PathArg(exists=True, dir_okay=False, path_type=Path),
                help="Class ids, one per line (labels = line numbers).",
            ),
            click.option(
                "--limit",
                type=click.IntRange(min=1),
                help="Use a fixed-seed random subset of this many images.",
            ),
            click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        ]
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return wrap


def _data(kw: dict) -> DataOptions | None:
    path = kw.pop("data_path")
    opts = (kw.pop("class_list"), kw.pop("limit"), kw.pop("batch_size"))
    return None if path is None else DataOptions(path, opts[1], opts[0], opts[2])


# Options shared by several commands, as ready-made decorators.
int8_range_option = click.option(
    "--int8-range",
    type=click.Choice(INT8_RANGES),
    default="safe",
    show_default=True,
    help="safe: the ONNX file computes the same on every CPU (8-bit weights that x86 CPUs "
    "without VNNI would add in saturating int16 pairs stay within ±64, a few sensitive layers "
    "keep the full grid as uint8 weights). full: the whole int8 grid, exact only on CPUs with "
    "AVX-512 VNNI, AVX-VNNI, AMX or ARM (an AVX2-only CPU computes something else).",
)
int8_widen_option = click.option(
    "--int8-widen-share",
    type=click.FloatRange(0, 1),
    default=None,
    help="--int8-range safe, 8-bit weights: the share of multiply-adds whose layers may get "
    "the full int8 grid back (uint8 weights in u8×u8 kernels: exact everywhere, about half "
    "the speed for those layers) [0.2].",
)


def input_bits_option(default: str) -> Callable:
    return click.option(
        "--input-bits",
        type=click.IntRange(MIN_BITS, MAX_BITS),
        help=f"Bits of the model input's quantizer, the image the first layer reads [{default}]. "
        "The papers keep the first layer at 8 bits; onnxruntime runs an 8-bit input at the "
        "cost of a narrower one.",
    )


strict_option = click.option(
    "--strict",
    is_flag=True,
    help="Refuse the model if any op has no integer kernel (by default such ops, e.g. "
    "LayerNorm, Softmax, GELU, run in float between DequantizeLinear and QuantizeLinear).",
)
weight_storage_option = click.option(
    "--weight-storage",
    type=click.Choice(WEIGHT_STORAGES),
    default="int8",
    show_default=True,
    help="int8: every weight width in int8, run by onnxruntime's integer kernels (fast). "
    "int4: 2-4-bit weights packed as int4 (opset 21), half the size, but onnxruntime "
    "dequantizes them to float on every call (about 2x slower than FP32).",
)


def _flag_option(flag: Flag, help: str | None = None) -> Callable:
    """The Click option of a method setting, from its registered `Flag`."""
    if flag.kind is bool:
        return click.option(flag.flag, flag.dest, is_flag=True, help=help or flag.help)
    if flag.choices is not None:
        kind: Any = click.Choice(flag.choices)
    elif flag.low is None and flag.high is None:
        kind = flag.kind
    else:
        ranged = click.IntRange if flag.kind is int else click.FloatRange
        kind = ranged(flag.low, flag.high, min_open=flag.low_open, max_open=flag.high_open)
    return click.option(flag.flag, flag.dest, type=kind, help=help or flag.help)


def method_options(
    flags: dict[str, Flag], only: tuple[str, ...] | None = None, help: dict[str, str] | None = None
):
    """Options generated from methods' registered settings dataclasses (`flags`, by field;
    `only`: these fields, in this order; `help`: a command's own wording)."""
    names = only if only is not None else tuple(flags)
    help = help or {}

    def wrap(fn: Callable) -> Callable:
        for name in reversed(names):
            fn = _flag_option(flags[name], help.get(name))(fn)
        return fn

    return wrap


def _settings_given(
    kw: dict, flags: dict[str, Flag], only: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Pop the generated flags out of a command's keyword arguments: the settings given, by
    field (a flag not given, or a switch left off, is absent; a switch gives `Flag.sets`)."""
    given = {}
    for name in only if only is not None else tuple(flags):
        value = kw.pop(flags[name].dest)
        if value is True:
            given[name] = flags[name].sets
        elif value is not None and value is not False:
            given[name] = value
    return given


def _methods(reconstructs: bool) -> list[str]:
    """Registered calibration methods that do (or do not) reconstruct, in registry order."""
    return [
        n for n, m in CALIBRATION_METHODS.items() if m.capabilities.reconstructs == reconstructs
    ]


def common(fn: Callable) -> Callable:
    fn = click.option(
        "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."
    )(fn)
    return click.option(
        "--seed",
        # torch and numpy both take 0 .. 2**63 - 1: larger seeds failed deep inside a stage
        type=click.IntRange(0, 2**63 - 1),
        default=0,
        show_default=True,
        help="Seed: the same seed gives the same result.",
    )(fn)


def run_stage(title: str, rows: Callable[[dict], list[tuple]]) -> Callable:
    """Wrap a command body: build the UI, run, print the table or JSON, map errors to exits."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, as_json: bool = False, **kwargs):
            ui = RichUI(json_mode=as_json)

            def fail(message: str, code: int) -> None:
                ui.error(message)
                if as_json:
                    click.echo(dump_json({"error": message, "exit_code": code}))
                sys.exit(code)

            try:
                result = fn(*args, ui=ui, **kwargs)
                if not distributed.reporting_process():
                    pass  # under torchrun, rank 0 alone reports
                elif as_json:
                    click.echo(dump_json(result))
                else:
                    ui.table(title, ["", ""], rows(result))
            except QcliError as e:
                fail(str(e), e.exit_code)
            except KeyboardInterrupt:
                fail("interrupted; previous outputs are left as they were", 130)
            except Exception as e:
                if os.environ.get("QCLI_DEBUG"):
                    raise
                trace = "QCLI_DEBUG=1 shows the traceback"
                fail(f"internal error {type(e).__name__}: {e} ({trace})", 1)

        return wrapper

    return deco


def _refuse_given(params: tuple[str, ...], why: str) -> None:
    """A flag the user typed that the chosen mode would not read is a usage error."""
    ctx = click.get_current_context()
    given = [
        "--" + p.replace("_", "-")
        for p in params
        if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        raise UsageError(f"{', '.join(given)} {why}")


def _widen_share(share: float | None, int8_range: str, bits: BitConfig | None) -> float | None:
    """--int8-widen-share only where there is a narrowed grid to widen, as the grid
    resolver's `narrowing_blocker` says (`bits` None: a bits.json plan, whose widths are
    read later)."""
    if share is None:
        return None
    blocker = narrowing_blocker(int8_range, None if bits is None else bits.weight)
    if blocker == "int8_range":
        raise UsageError("--int8-widen-share applies only to --int8-range safe")
    if blocker == "weight_bits":
        raise UsageError(
            f"--int8-widen-share applies only to 8-bit weights, not {bits.weight}-bit ones"
        )
    return share


def _kv(keys: list[str]) -> Callable[[dict], list[tuple]]:
    return lambda r: [(k, r.get(k)) for k in keys if k in r]


class QcliGroup(click.Group):
    """Under --json, a usage error also prints {"error", "exit_code"} on stdout, so scripts
    parse every outcome (stage failures do the same in `run_stage`)."""

    def invoke(self, ctx: click.Context) -> Any:
        wants_json = "--json" in [*ctx.args, *getattr(ctx, "_protected_args", [])]
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            if wants_json:
                click.echo(dump_json({"error": e.format_message(), "exit_code": e.exit_code}))
            raise


@click.group(
    cls=QcliGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="qcli")
def cli() -> None:
    """Quantize PyTorch vision models to ONNX QDQ that onnxruntime runs with integer kernels.

    \b
    One line, data-free, on the embedded EfficientNet-Lite0:
      qcli quantize --out effl0-w8
    Or stage by stage (each a file in, a file out):
      qcli generate-data builtin:efficientnet_lite0 --num-images 64 --out calib/
      qcli calibrate builtin:efficientnet_lite0 --data calib/ --bits w8a8 --out m.qcli
      qcli export m.qcli --out m.onnx
      qcli eval m.onnx --data images/ --reference builtin:efficientnet_lite0
    """


# -- quantize -------------------------------------------------------------------------------

# The method settings `quantize` exposes, with its own wording (its defaults differ).
QUANTIZE_SETTINGS = ("iters", "stop", "granularity", "metaaug")
QUANTIZE_HELP = {
    "iters": "Reconstruction iterations per unit when the method reconstructs; a ceiling under "
    f"--stop plateau [at most {ONE_SHOT_ITERS['8-bit activations']} with 8-bit activations, "
    f"{ONE_SHOT_ITERS['narrow activations']} with narrower ones; fewer where the model's "
    "activations would take over ~10 minutes on 2 cores].",
    "stop": "Reconstruction effort: every unit runs --iters, or a unit stops when its loss "
    "stops improving [fixed with --data, plateau on generated images].",
    "granularity": "Reconstruction unit when the method reconstructs (see calibrate); mrecg: "
    "blocks with the largest capacity gaps merged (brecq, qdrop).",
    "metaaug": "MetaAug: reconstruct on the calibration images plus learned transforms of them "
    "(adaquant, brecq, qdrop; see calibrate --metaaug).",
}


def _quantize_rows(r: dict) -> list[tuple]:
    fp, q = r["eval_fp"], r["eval_quantized"]
    dep = r.get("deployment", {})
    rows = [
        ("model", r["model"]),
        ("bits / method", f"{r['bits']} / {r['method']}"),
        *_plan_rows(r.get("plan")),
        *_ops_rows(r.get("calibrate", {}).get("ops")),
        ("evaluated on", r["eval_data"]),
    ]
    if fp.get("top1") is not None:
        rows.append(("top-1 FP -> quantized", f"{_pct(fp['top1'])} -> {_pct(q['top1'])}"))
        rows.append(("agreement with FP", _pct(q.get("agreement_with_reference"))))
    else:  # generated or unlabeled images: agreement is the only accuracy-like figure
        rows.append(
            (
                "agreement with FP",
                f"{_pct(q.get('agreement_with_reference'))} of images get the float model's "
                "top-1 class (no labels here: pass --eval-data with labelled images for top-1)",
            )
        )
    rows += [
        ("sim vs onnxruntime", _sim_vs_ort(r["export"]["check"])),
        ("exact on CPUs", ", ".join(r["export"]["exact_on"])),
    ]
    lat = dep.get("latency_ms", {})
    for b in (1, 64):
        a, z = lat.get("fp32", {}).get(b), lat.get("int8", {}).get(b)
        if a and z:
            speed = f"{a / z:.2f}x faster" if a >= z else f"{z / a:.2f}x slower"
            rows.append((f"latency b{b} onnxruntime FP32 -> INT8", f"{a} -> {z} ms ({speed})"))
    if dep:
        size = f"{_mb(dep['fp32_onnx_bytes'])} -> {_mb(dep['int8_onnx_bytes'])}"
        rows.append(("size ONNX FP32 -> INT8", size))
    rows.append(("output", f"{r['out']}/model.onnx"))
    return rows


def _plan_rows(plan: dict | None) -> list[tuple]:
    """Weight widths per layer kind, and the packed size against the budget."""
    if not plan:
        return []
    kinds = "; ".join(
        f"{kind} " + " ".join(f"{n}×{'fp' if b == 32 else b}" for b, n in widths.items())
        for kind, widths in plan["weights"].items()
    )
    size = f"{plan['weight_bytes']:,} bytes"
    if "budget_bytes" in plan:
        size += f" of {plan['budget_bytes']:,} allowed"
        if plan.get("predicted_kl") is not None:
            size += f" (predicted KL {plan['predicted_kl']:.3g})"
    return [("weight bits per layer kind", kinds), ("packed weights", size)]


def _ops_rows(ops: dict | None) -> list[tuple]:
    """What runs in integer kernels and what in float (capture's op report)."""
    if not ops:
        return []
    rows = [("integer kernels", f"{ops['integer_ops']} of {ops['compute_ops']} compute ops")]
    if ops["float_ops"]:
        counts = ", ".join(f"{k} ×{v}" for k, v in ops["float_ops"].items())
        rows.append(("float (DQ -> op -> Q)", counts))
    if ops.get("float_leaves"):
        rows.append(("untraceable, float", ", ".join(ops["float_leaves"])))
    return rows


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _mb(v) -> str:
    return "-" if v is None else f"{v / 2**20:.2f} MB"


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option(
    "--bits",
    type=BitsType(),
    default="w8a8",
    show_default=True,
    help="wXaY, or weight bits alone (activations 8). 4-bit weights need a reconstruction "
    "method on depthwise models: range setting alone loses most of EfficientNet-Lite0's "
    "accuracy at w4a8.",
)
@click.option(
    "--out",
    type=PathArg(path_type=Path),
    required=True,
    help="Output folder (model.qcli, model.onnx, summary.json).",
)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--method",
    type=click.Choice(sorted(CALIBRATION_METHODS)),
    help=f"Calibration method [{describe_default_method()}].",
)
@click.option(
    "--eval-data",
    type=PathArg(path_type=Path),
    help="Labelled images to evaluate on (default: --data).",
)
@click.option(
    "--num-images",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Images to generate when no --data is given.",
)
@click.option(
    "--gen-iters",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Generator iterations when no --data is given.",
)
@click.option(
    "--gen-method",
    type=click.Choice(sorted(DATA_METHODS)),
    default="dgh",
    show_default=True,
    help="Data generator when no --data is given (see generate-data).",
)
@click.option(
    "--bn-tune/--no-bn-tune",
    default=True,
    show_default=True,
    help="BN tuning after calibration: re-estimates each conv's output statistics on the "
    "calibration images (seconds; it helps at 8 bits too).",
)
@click.option("--no-latency", is_flag=True, help="Skip latency measurement.")
@method_options(calibration_flags(), QUANTIZE_SETTINGS, QUANTIZE_HELP)
@click.option(
    "--mixed/--uniform",
    default=None,
    help="--mixed: the size of uniform --bits weights is a budget; allocate-bits picks 2, 3, "
    "4 or 8 bits per layer (integer program on estimated sensitivities). --uniform: every "
    "layer at --bits. Neither (below 8-bit weights): the allocation runs and its plan is "
    "used where it predicts at most a quarter of uniform weights' degradation.",
)
@input_bits_option(
    f"{ONE_SHOT_INPUT_BITS['real']} below 8-bit activations with --data, else the activation width"
)
@int8_range_option
@int8_widen_option
@weight_storage_option
@strict_option
@model_options
@data_options(required=False)
@common
@run_stage("qcli quantize", _quantize_rows)
def quantize(
    model,
    bits,
    out,
    force,
    method,
    eval_data,
    num_images,
    gen_iters,
    gen_method,
    bn_tune,
    no_latency,
    mixed,
    input_bits,
    int8_range,
    int8_widen_share,
    weight_storage,
    strict,
    seed,
    ui,
    **kw,
):
    """The whole chain: [generate data] -> [allocate bits] -> calibrate -> export -> eval.

    \b
    Examples:
      qcli quantize --out effl0-w8                   # embedded EfficientNet-Lite0, data-free
      qcli quantize --bits 4 --iters 100 --out effl0-w4   # 2-8 bits at the 4-bit size
      qcli quantize --bits 4 --uniform --out effl0-u4     # every layer at 4 bits
      qcli quantize builtin:resnet20_cifar10 --weights r20.th --bits w8a8 \\
          --data cifar10/train --limit 1024 --eval-data cifar10/test --out r20-w8
    """
    from qcli.stages.quantize import QuantizeConfig, is_mixed
    from qcli.stages.quantize import quantize as run

    precision = None if mixed is None else ("mixed" if mixed else "uniform")

    given = _settings_given(kw, calibration_flags(), QUANTIZE_SETTINGS)
    mo = _model(model, kw)
    data = _data(kw)
    if data is not None:
        _refuse_given(("num_images", "gen_iters", "gen_method"), "only apply without --data")
    else:
        _refuse_given(("limit", "class_list"), "only apply with --data")
    ev = DataOptions(eval_data, batch_size=data.batch_size if data else 32) if eval_data else None
    cfg = QuantizeConfig(
        mo,
        out,
        bits,
        data,
        ev,
        method,
        gen_method=gen_method,
        gen_images=num_images,
        gen_iters=gen_iters,
        seed=seed,
        force=force,
        latency=not no_latency,
        iters=given.get("iters"),
        stop=given.get("stop"),
        granularity=given.get("granularity"),
        bn_tune=bn_tune,
        int8_range=int8_range,
        widen_share=_widen_share(
            int8_widen_share, int8_range, None if is_mixed(bits, precision) else bits
        ),
        weight_storage=weight_storage,
        precision=precision,
        metaaug=given.get("metaaug", False),
        strict=strict,
        input_bits=input_bits,
    )
    return run(cfg, ui)


# -- generate-data --------------------------------------------------------------------------


@cli.command("generate-data")
@click.argument("model")
@click.option(
    "--method",
    type=click.Choice(sorted(DATA_METHODS)),
    default="dgh",
    show_default=True,
    help="dgh: DGH (set-level BN statistics, augmentations, output stretching); "
    "bns: per-batch BN matching (ZeroQ); noise: Gaussian noise.",
)
@click.option("--num-images", type=int, default=256, show_default=True, help="Images to make.")
@click.option(
    "--batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Images optimized together; memory grows with it, not with --num-images.",
)
@click.option("--iters", type=int, help="Optimization steps per batch (default: the method's).")
@click.option("--lr", type=float, help="Learning rate of the image optimizer.")
@method_options(data_flags())
@click.option(
    "--preview",
    type=PathArg(dir_okay=False, path_type=Path),
    help="Also write a PNG grid of the first 64 images (de-normalized).",
)
@click.option(
    "--out", type=PathArg(path_type=Path), required=True, help="Data-set folder to write."
)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@model_options
@common
@run_stage(
    "qcli generate-data",
    _kv(
        [
            "out",
            "method",
            "images",
            "seconds",
            "images_per_second",
            "final_bn_loss",
            "final_output_loss",
            "preview",
        ]
    ),
)
def generate_data(
    model,
    method,
    num_images,
    batch_size,
    iters,
    lr,
    preview,
    out,
    force,
    seed,
    ui,
    **kw,
):
    """Generate calibration images from the model alone (no data needed).

    \b
    Examples:
      qcli generate-data builtin:resnet20_cifar10 --weights r20.th \\
          --num-images 256 --out r20-calib/ --preview r20-calib.png
      qcli generate-data builtin:resnet20_cifar10 --weights r20.th --no-aggregate \\
          --num-images 256 --out r20-ablation/          # DGH without set-level statistics
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data r20-calib/ \\
          --bits w8a8 --out r20-w8.qcli
    """
    from qcli.stages.generate_data import GenerateConfig, generate

    options = _settings_given(kw, data_flags())  # the method refuses the fields it lacks
    cfg = GenerateConfig(
        _model(model, kw), out, method, num_images, batch_size, iters, lr, seed, force
    )
    return generate(dataclasses.replace(cfg, options=options, preview=preview), ui)


# -- calibrate ------------------------------------------------------------------------------


def _calibrate_rows(r: dict) -> list[tuple]:
    if "units" in r and "out" not in r:  # --show-units
        rows = [("model", r["model"]), ("granularity", r["granularity"])]
        rows.append(("units", len(r["units"])))
        return rows + _mrecg_rows(r.get("mrecg"))
    if "ops" in r and "out" not in r:  # --show-float
        return [("model", r["model"]), *_ops_rows(r["ops"])]
    keys = ["out", "model", "bits", "method", "layers", "activation_quantizers", "images"]
    rows = _kv(keys)(r) + _ops_rows(r.get("ops"))
    units = r.get("reconstruction", {}).get("units")
    if units:
        steps = sorted(u["steps"] for u in units)
        span = f"{steps[0]}-{steps[-1]} per unit"
        rows.append(("reconstruction", f"{len(units)} units, {sum(steps)} steps ({span})"))
    meta = r.get("metaaug")
    if meta:
        rows.append(
            (
                "MetaAug",
                f"{len(meta['units'])} units, {meta['seconds']} s meta phase, "
                f"peak RSS {meta['peak_rss_mb_before']:.0f} -> {meta['peak_rss_mb']:.0f} MB",
            )
        )
    recon = r.get("reconstruction", {})
    rows += _mrecg_rows(recon.get("mrecg"))
    for label, p in recon.get("oscillation", {}).get("profiles", {}).items():
        osc = p["oscillation"]
        rows.append(
            (f"oscillation, {label}", f"{osc['decreases']} drops, relative {osc['relative']:.3f}")
        )
    if r.get("plot"):
        rows.append(("loss plot", r["plot"]))
    if r.get("tuning"):
        rows.append(("BN/bias tuning", f"{r['tuning']['seconds']} s"))
    widened = r.get("int8_range", {}).get("widened")
    if widened is not None:
        share = r["int8_range"].get("mac_share", 0.0)
        rows.append(
            (
                "full int8 grid (uint8 weights)",
                f"{len(widened)} layers, {100 * share:.1f}% of multiply-adds",
            )
        )
    return [*rows, ("seconds", r.get("seconds"))]


def _mrecg_rows(d: dict | None) -> list[tuple]:
    """MRECG's decision: the capacity used and each merged group with its gaps."""
    if not d:
        return []
    merged = "; ".join(
        f"{'+'.join(g['units'])} (gap {', '.join(f'{x:.4g}' for x in g['gaps'])})"
        for g in d["merged"]
    )
    return [("MRECG capacity", d["capacity"]), ("MRECG merged", merged or "none")]


@cli.command()
@click.argument("model")
@click.option("--bits", type=BitsType(), default="w8a8", show_default=True, help="wXaY, e.g. w4a8.")
@click.option(
    "--method",
    type=click.Choice(sorted(CALIBRATION_METHODS)),
    default="mse",
    show_default=True,
    help=f"Range setting ({', '.join(_methods(reconstructs=False))}) or reconstruction "
    f"({', '.join(_methods(reconstructs=True))}).",
)
@method_options(calibration_flags())
@click.option(
    "--plot",
    type=PathArg(dir_okay=False, path_type=Path),
    help="Write a PNG of the per-unit reconstruction loss along depth (oscillation).",
)
@click.option("--bn-tune", is_flag=True, help="Re-estimate per-channel statistics and refold.")
@click.option("--bias-tune", is_flag=True, help="Correct the per-channel output shift.")
@click.option(
    "--show-units",
    is_flag=True,
    help="Print the reconstruction units and exit (no --data, except MRECG's loss capacity).",
)
@click.option(
    "--show-float",
    is_flag=True,
    help="Print the ops that have no integer kernel (they run in float between "
    "DequantizeLinear and QuantizeLinear) and exit; needs no --data.",
)
@strict_option
@click.option(
    "--keep-fp",
    type=CommaList(),
    default="",
    help="Comma-separated conv/linear layers to leave in float.",
)
@click.option(
    "--bit-config",
    type=PathArg(exists=True, dir_okay=False, path_type=Path),
    help="bits.json from allocate-bits: per-layer widths (replaces --bits, --keep-fp, "
    "--int8-range).",
)
@input_bits_option("the activation width")
@int8_range_option
@int8_widen_option
@click.option("--out", type=PathArg(path_type=Path), help="Quantized-model folder (.qcli).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@model_options
@data_options(required=False)
@common
@run_stage("qcli calibrate", _calibrate_rows)
def calibrate(
    model,
    bits,
    method,
    plot,
    bn_tune,
    bias_tune,
    show_units,
    show_float,
    strict,
    keep_fp,
    bit_config,
    input_bits,
    int8_range,
    int8_widen_share,
    out,
    force,
    seed,
    ui,
    **kw,
):
    """Quantize MODEL using calibration images; writes a .qcli folder.

    \b
    Examples:
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --limit 1024 --bits w4a8 --method mse --out r20-w4a8.qcli
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --limit 1024 --bits w4a4 --method qdrop --iters 1000 --bn-tune --out r20-w4a4.qcli
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --limit 128 --bits w4a4 --method qdrop --metaaug --meta-iters 50 --out r20-meta.qcli
      qcli calibrate builtin:efficientnet_lite0 --method brecq --show-units
      qcli calibrate timm:vit_tiny_patch16_224 --show-float   # what stays in float
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --limit 1024 --bits w2a4 --method qdrop --granularity mrecg --merges 2 \\
          --plot r20-loss.png --out r20-w2a4.qcli   # MRECG, loss profile as a PNG
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --bit-config bits.json --method adaround --out r20-mixed.qcli   # mixed precision
    """
    from qcli.stages.calibrate import CalibrateConfig, show_float_of, show_units_of
    from qcli.stages.calibrate import calibrate as run

    if bit_config is not None:
        _refuse_given(("bits", "keep_fp", "int8_range"), "cannot be given with --bit-config")
    settings = _settings_given(kw, calibration_flags())
    data = _data(kw)
    cfg = CalibrateConfig(
        _model(model, kw),
        data,
        out,
        bits,
        method,
        keep_fp,
        seed,
        force,
        settings,
        bn_tune,
        bias_tune,
        int8_range,
        bit_config=bit_config,
        plot=plot,
        widen_share=_widen_share(int8_widen_share, int8_range, None if bit_config else bits),
        strict=strict,
        input_bits=input_bits,
    )
    if show_units:
        return show_units_of(cfg, settings.get("granularity"), ui)
    if show_float:
        return show_float_of(cfg, ui)
    if data is None:
        raise UsageError("calibrate needs --data (calibration images)")
    if out is None:
        raise UsageError("calibrate needs --out (the .qcli folder to write)")
    return run(cfg, ui)


# -- qat ------------------------------------------------------------------------------------


def _qat_rows(r: dict) -> list[tuple]:
    return [
        ("out", r["out"]),
        ("model", r["model"]),
        ("bits", r["bits"]),
        ("coreset", r["coreset"]),
        ("epochs / images", f"{r['epochs']} / {r['images']:,}"),
        ("processes", r["processes"]),
        ("loss first -> last epoch", f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}"),
        ("training / scoring", f"{r['train_s']:.1f} s / {r['score_s']:.1f} s"),
    ]


@cli.command()
@click.argument("model")
@click.option(
    "--train-data",
    type=PathArg(path_type=Path),
    required=True,
    help="Labelled image folder (DIR/<class>/<image>) to train on.",
)
@click.option(
    "--bits", type=BitsType(), help="wXaY, e.g. w4a4 (MODEL only; a .qcli keeps its plan)."
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--coreset",
    type=click.Choice(CORESETS),
    default="acs",
    show_default=True,
    help="acs: the images the quantized model gets most wrong or disagrees most on with the "
    "float model, re-chosen every --interval epochs; random: a fresh random subset as large; "
    "full: every image.",
)
@click.option(
    "--fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    show_default=True,
    help="Share of every class in the coreset (acs, random).",
)
@click.option(
    "--interval",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Epochs between coreset selections (acs, random).",
)
@click.option(
    "--kd/--no-kd",
    default=True,
    show_default=True,
    help="Distil from the float model (soft cross-entropy); --no-kd trains on the labels.",
)
@click.option("--optimizer", type=click.Choice(QAT_OPTIMIZERS), default="sgd", show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Learning rate of weights and step sizes [sgd: 0.001, adam: 0.0001].",
)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--calib-images",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="MODEL only: training images for the initial MSE range setting.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Train on a fixed-seed random subset.")
@click.option(
    "--class-list",
    type=PathArg(exists=True, dir_okay=False, path_type=Path),
    help="Class ids, one per line (labels = line numbers).",
)
@click.option(
    "--keep-fp",
    type=CommaList(),
    default="",
    help="MODEL only: conv/linear layers to leave in float.",
)
@int8_range_option
@click.option(
    "--checkpoint",
    type=PathArg(path_type=Path),
    help="Checkpoint file written every epoch [OUT.ckpt]; removed when the run completes.",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint of an interrupted run.")
@click.option("--out", type=PathArg(path_type=Path), required=True, help="Trained .qcli folder.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@model_options
@common
@run_stage("qcli qat", _qat_rows)
def qat(
    model,
    train_data,
    bits,
    epochs,
    coreset,
    fraction,
    interval,
    kd,
    optimizer,
    lr,
    weight_decay,
    batch_size,
    calib_images,
    limit,
    class_list,
    keep_fp,
    int8_range,
    checkpoint,
    resume,
    out,
    force,
    seed,
    ui,
    **kw,
):
    """Quantization-aware training of MODEL or a calibrated .qcli; writes a .qcli folder.

    LSQ step sizes (initialized from the .qcli's calibration, or from MSE range setting),
    straight-through rounding, distillation from the float model, a cosine schedule, and
    ACS coresets. A checkpoint is written every epoch; --resume continues from it.
    Under torchrun every process trains its share of each batch (DistributedDataParallel).

    \b
    Examples:
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --limit 1024 --bits w4a4 --method mse --out r20-w4a4.qcli
      qcli qat r20-w4a4.qcli --train-data cifar10/train --epochs 10 --coreset acs \\
          --fraction 0.1 --interval 2 --out r20-w4a4-qat.qcli
      torchrun --nproc-per-node 2 -m qcli qat r20-w4a4.qcli --train-data cifar10/train \\
          --epochs 10 --coreset full --out r20-w4a4-full.qcli
    """
    from qcli.methods.qat import DEFAULT_LR, QATSettings
    from qcli.stages.common import is_qmodel
    from qcli.stages.qat import QATConfig
    from qcli.stages.qat import qat as run

    if coreset == "full":
        for flag in ("fraction", "interval"):
            _refuse_given((flag,), "does not apply to --coreset full (it uses every image)")
    if is_qmodel(model):
        _refuse_given(
            ("bits", "keep_fp", "int8_range", "calib_images", "image_size", "mean", "std"),
            "cannot be given with a .qcli input: it keeps its plan and calibration",
        )
    mo = _model(model, kw)
    settings = QATSettings(
        epochs=epochs,
        coreset=coreset,
        fraction=fraction,
        interval=interval,
        kd=kd,
        optimizer=optimizer,
        lr=lr or DEFAULT_LR[optimizer],
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
    )
    cfg = QATConfig(
        mo,
        train_data,
        out,
        settings,
        bits,
        keep_fp,
        int8_range,
        calib_images,
        class_list,
        limit,
        checkpoint,
        resume,
        force,
    )
    return run(cfg, ui)


# -- allocate-bits --------------------------------------------------------------------------


def _allocate_rows(r: dict) -> list[tuple]:
    m = r.get("measured") or {}
    rows = [
        ("out", r["out"]),
        ("model", r["model"]),
        ("budget", f"{r['budget']['requested']} (met: {r['budget']['met']})"),
        ("solver / status", f"{r['solver']} / {r['status']} in {r['seconds']:.3f} s"),
        ("weight size", f"{r['size_bytes']:,.0f} bytes"),
        ("bit-operations", f"{r['bops'] / 1e9:.3f} G"),
        (
            "predicted KL / top-1 changes",
            f"{r['predicted_degradation']:.4f} / {r['predicted_drop_pct']:.2f}%",
        ),
    ]
    if m:
        rows.append(
            (
                "measured KL / drop / top-1 changes",
                f"{m['kl']:.4f} / {m['drop_pct']:.2f}% / {m['flips_pct']:.2f}%",
            )
        )
    return [*rows, ("sensitivity", f"{r.get('sensitivity_seconds')} s")]


@cli.command("allocate-bits")
@click.argument("model", default=DEFAULT_MODEL)
@click.option(
    "--weight-bits", default="2,3,4,8", show_default=True, help="Candidate weight widths."
)
@click.option("--act-bits", default="8", show_default=True, help="Candidate activation widths.")
@click.option(
    "--max-size",
    help="Weight-size budget: bytes with a unit (120KB, 0.5MB, 2MiB) or the size of uniform "
    "weights (4bit).",
)
@click.option("--max-size-ratio", help="Weight-size budget as a share of the float32 size.")
@click.option(
    "--max-bops",
    help="Bit-operation budget per image: giga bit-operations (2.5) or a uniform width (w4a8).",
)
@click.option(
    "--max-drop",
    help="Degradation budget in percent: the top-1 confidence each quantizer's width loses "
    "beyond its widest candidate, summed (minimizes size instead).",
)
@click.option(
    "--solver",
    type=click.Choice(SOLVERS),
    default="ip",
    show_default=True,
    help="ip: the optimal integer program (OR-Tools CP-SAT); greedy: the baseline.",
)
@click.option(
    "--images",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Calibration images the sensitivities are measured on (without --limit).",
)
@click.option(
    "--sensitivities",
    type=PathArg(exists=True, dir_okay=False, path_type=Path),
    help="Reuse the sensitivities stored in an earlier bits.json (no --data needed).",
)
@click.option(
    "--sensitivity",
    type=click.Choice(SENSITIVITY_MODES),
    help="measure [default]: run the model once per quantizer and width; estimate: every "
    "quantizer's KL from one forward and one backward pass per batch and width (a "
    "second-order estimate; not with --max-drop).",
)
@click.option(
    "--keep-fp",
    type=CommaList(),
    default="",
    help="Comma-separated conv/linear layers to leave in float.",
)
@int8_range_option
@click.option("--out", type=PathArg(path_type=Path), help="bits.json to write.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@model_options
@data_options(required=False)
@common
@run_stage("qcli allocate-bits", _allocate_rows)
def allocate_bits(
    model,
    weight_bits,
    act_bits,
    max_size,
    max_size_ratio,
    max_bops,
    max_drop,
    solver,
    images,
    sensitivities,
    sensitivity,
    keep_fp,
    int8_range,
    out,
    force,
    seed,
    ui,
    **kw,
):
    """Choose per-layer bit widths under a budget; writes bits.json for calibrate.

    Measures how much each quantizer alone degrades the model at every candidate width
    (KL to the float output on the calibration images; --sensitivity estimate: a one-pass
    second-order estimate of it), then picks one width per quantizer
    minimizing the summed degradation under the budget (or the size under --max-drop).

    \b
    Examples:
      qcli allocate-bits builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --weight-bits 2,3,4,8 --act-bits 8 --max-size 4bit --out bits.json
      qcli calibrate builtin:resnet20_cifar10 --weights r20.th --data cifar10/train \\
          --bit-config bits.json --method mse --out r20-mixed.qcli
      qcli allocate-bits builtin:resnet20_cifar10 --weights r20.th \\
          --sensitivities bits.json --max-size 3bit --solver greedy --out bits3.json
      qcli allocate-bits builtin:efficientnet_lite0 --data calib/ --images 100 \\
          --sensitivity estimate --max-size 4bit --out bits.json
    """
    from qcli.stages.allocate import AllocateConfig, parse_budget, parse_widths
    from qcli.stages.allocate import allocate_bits as run

    given = {
        k: v
        for k, v in {
            "size": max_size,
            "ratio": max_size_ratio,
            "bops": max_bops,
            "drop": max_drop,
        }.items()
        if v is not None
    }
    if len(given) != 1:
        raise UsageError(
            "give exactly one budget: --max-size, --max-size-ratio, --max-bops or --max-drop"
        )
    ((kind, text),) = given.items()
    budget = parse_budget(kind, text)
    cfg = AllocateConfig(
        _model(model, kw),
        _data(kw),
        out,
        budget,
        parse_widths("--weight-bits", weight_bits),
        parse_widths("--act-bits", act_bits),
        solver,
        keep_fp,
        int8_range,
        images,
        sensitivities,
        sensitivity or "measure",
        seed=seed,
        force=force,
    )
    if sensitivities is not None and sensitivity is not None:
        raise UsageError("--sensitivity does not apply with --sensitivities (nothing is measured)")
    return run(cfg, ui)


# -- export ---------------------------------------------------------------------------------


def _sim_vs_ort(check: dict) -> str:
    """What the export compared: bit for bit against onnxruntime's integer kernels where it
    could, else top-1 against its reference arithmetic."""
    e = check.get("exact")
    if e is None:
        return (
            f"{check['disagreement_pct']:.2f}% top-1 differ (reference arithmetic only: this "
            "CPU's integer kernels compute another function for this file)"
        )
    counts = (
        f"{e['images_differ']} of {e['images']} images, "
        f"{e['tensors_differ']} of {e['tensors']} tensors differ"
    )
    if not e["tensors_differ"]:
        return f"exact ({counts})"
    floats = len(e["float_ops"])
    why = f"{floats} ops run in float" if floats else "int4 weights run in float"
    return f"{counts}; not integer end to end ({why})"


def _export_rows(r: dict) -> list[tuple]:
    c = r["check"]
    ref = c["runs"]["reference"]
    check = f"{ref['disagreement_pct']:.2f}% top-1 differ, max |Δlogit| {ref['max_abs_diff']:.3g}"
    if not ref.get("tolerance_enforced", True):
        check += " (reported: the integer path is exact)"
    return [
        ("out", r["out"]),
        ("opset", r["opset"]),
        ("bits", r["bits"]),
        ("weight storage", r["weight_storage"]),
        ("exact on CPUs", ", ".join(r["exact_on"])),
        ("size", _mb(r["bytes"])),
        ("sim vs onnxruntime", _sim_vs_ort(c)),
        ("fake-quant sim vs reference arithmetic", check),
    ]


@cli.command()
@click.argument("qmodel", type=PathArg(path_type=Path))
@click.option("--out", type=PathArg(path_type=Path), required=True, help="ONNX file to write.")
@click.option(
    "--check-data",
    type=PathArg(path_type=Path),
    help="Images for the onnxruntime check (default: the calibration data).",
)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--weights",
    type=PathArg(exists=True, dir_okay=False, path_type=Path),
    help="The weights (or model) file the .qcli was made from, if it moved since.",
)
@weight_storage_option
@common
@run_stage("qcli export", lambda r: _export_rows(r))
def export(qmodel, out, check_data, force, weights, weight_storage, seed, ui):
    """Write a .qcli folder as ONNX QDQ and check onnxruntime against the simulation.

    The check runs onnxruntime twice, with its integer kernels and with its reference
    arithmetic (graph optimizations off), so its verdict does not depend on this CPU.

    \b
    Examples:
      qcli export r20-w4a8.qcli --out r20-w4a8.onnx                 # int8 storage: fast
      qcli export r20-w4a8.qcli --out r20-w4a8-small.onnx --weight-storage int4
    """
    from qcli.stages.export import ExportConfig
    from qcli.stages.export import export as run

    if not qmodel.exists():
        raise QcliError(f"quantized model '{qmodel}' does not exist")
    cfg = ExportConfig(qmodel, out, check_data, force=force, seed=seed)
    return run(dataclasses.replace(cfg, weight_storage=weight_storage, weights=weights), ui)


# -- eval -----------------------------------------------------------------------------------


def _eval_rows(r: dict) -> list[tuple]:
    rows = [
        ("target", r["target"]),
        ("kind", r["kind"] + (f" ({r['simulation']} simulation)" if "simulation" in r else "")),
        ("images", r["n_images"]),
        ("top-1", _pct(r["top1"])),
        ("top-5", _pct(r["top5"])),
    ]
    if r.get("agreement_with_reference") is not None:
        rows.append(("agreement with reference", _pct(r["agreement_with_reference"])))
    if "cpu" in r:
        safe = "yes" if not r["saturating_layers"] else f"no ({r['saturating_layers']} layers)"
        rows.append(("CPU integer kernels", r["cpu"]))
        rows.append(("exact on every CPU (static check)", safe))
    if r.get("kernel_check"):
        k = r["kernel_check"]
        changed = f"{_pct(k['changed_pct'])} top-1 change ({k['changed']}/{k['images']})"
        rows.append(("kernel check (integer vs reference)", changed))
    for b, ms in r.get("latency_ms", {}).items():
        rows.append((f"latency batch {b}", f"{ms} ms"))
    if "bytes" in r:
        rows.append(("size", _mb(r["bytes"])))
    if r.get("skipped_images"):
        rows.append(("skipped images", r["skipped_images"]))
    return rows


@cli.command("eval")
@click.argument("target")
@click.option("--reference", help="Model, .qcli or .onnx to compare top-1 predictions with.")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option(
    "--no-kernel-check",
    is_flag=True,
    help="ONNX: skip the second run with onnxruntime's reference arithmetic.",
)
@click.option(
    "--simulation",
    type=click.Choice(SIMULATIONS),
    default="exact",
    show_default=True,
    help=".qcli: 'exact' computes what onnxruntime's integer kernels compute, bit for bit; "
    "'fake-quant' the training-time simulation (float32 on dequantized values).",
)
@model_options
@data_options(required=True)
@common
@run_stage("qcli eval", _eval_rows)
def eval_cmd(target, reference, no_latency, threads, no_kernel_check, simulation, seed, ui, **kw):
    """Top-1/top-5, agreement, latency and size of an ONNX file, a .qcli folder or a MODEL.

    For an ONNX file it also names this CPU's integer-kernel class (avx2, avx512,
    avx512-vnni, avx-vnni, amx, arm-dotprod, arm), checks the file statically for layers
    whose int16 pair sums could saturate on x86 CPUs without VNNI, and runs the kernel check:
    the share of images whose top-1 class changes between onnxruntime's integer kernels and
    its reference arithmetic (graph optimizations off). Near 0 means the deployed arithmetic
    is the simulated one on this CPU; the reference convolves dequantized values in float,
    so a few one-step rounding flips (typically under 1-2% of images) remain even then.

    A .qcli folder runs in the integer-exact simulation by default: what onnxruntime's
    integer kernels compute, bit for bit (`eval m.onnx --reference m.qcli` then agrees on
    every image where the file is integer end to end); `--simulation fake-quant` runs the
    training-time simulation (float32 on dequantized values) instead.

    \b
    Example:
      qcli eval r20-w4a8.onnx --data cifar10/test --reference builtin:resnet20_cifar10 \\
          --weights r20.th --json
    """
    from qcli.stages.evaluate import EvalConfig, evaluate

    mo = _model(target, kw)
    cfg = EvalConfig(
        target,
        _data(kw),
        reference,
        mo,
        not no_latency,
        threads,
        seed,
        not no_kernel_check,
        simulation,
    )
    return evaluate(cfg, ui)


def main() -> None:
    cli(prog_name="qcli")


if __name__ == "__main__":
    main()
