"""`qcli eval`: accuracy, agreement with a reference, latency and size of any target.

A target is an ONNX file (run in onnxruntime), a .qcli folder (its PyTorch simulation) or a
MODEL spec (the float model): the same numbers for each, so they compare directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch

from qcli.data import iterate
from qcli.errors import QcliError
from qcli.evaluate import KernelCheck, OrtModel, accuracy, file_size, latency
from qcli.export import kernels
from qcli.models import IMAGENET_SPEC, InputSpec
from qcli.quant.exact import run_exact
from qcli.stages.common import (
    DataOptions,
    ModelOptions,
    is_qmodel,
    load_qmodel,
    open_dataset,
    report_skipped,
)
from qcli.ui import UI


@dataclass
class Target:
    """Something that maps images to logits, with the preprocessing it expects."""

    name: str
    kind: str  # onnx | qcli | model
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_spec: InputSpec
    size_path: Path | None
    metadata: dict[str, str] = field(default_factory=dict)  # an ONNX file's metadata_props


@dataclass(frozen=True)
class EvalConfig:
    target: str
    data: DataOptions
    reference: str | None = None
    model: ModelOptions = field(default_factory=ModelOptions)
    latency: bool = True
    threads: int | None = None
    seed: int = 0
    kernel_check: bool = True
    simulation: str = "exact"  # a .qcli target: one of SIMULATIONS


# How a .qcli folder is evaluated: "exact" computes what onnxruntime's integer kernels do
# (quant.exact), "fake-quant" the training-time simulation (float32 on dequantized values).
SIMULATIONS = ("exact", "fake-quant")


def resolve_target(
    text: str,
    opts: ModelOptions,
    threads: int | None = None,
    ui: UI | None = None,
    simulation: str = "exact",
) -> Target:
    path = Path(text)
    if path.suffix == ".onnx" or (path.is_file() and _is_onnx(path)):
        ort_model = OrtModel(path, threads=threads)
        meta = ort_model.session.get_modelmeta().custom_metadata_map
        return Target(text, "onnx", ort_model, _onnx_input_spec(path, opts), path, dict(meta))
    if is_qmodel(path):
        qm = load_qmodel(path, opts.weights)
        module = qm.graph.module.eval()
        fn = _exact(module) if simulation == "exact" else _no_grad(module)
        return Target(text, "qcli", fn, qm.input_spec, path, {"simulation": simulation})
    loaded = replace(opts, spec=text).load(ui)
    weights = Path(loaded.source.weights) if loaded.source.weights else None
    size_path = weights if weights else (path if path.is_file() else None)
    return Target(text, "model", _no_grad(loaded.module), loaded.input_spec, size_path)


def _no_grad(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return fn


def _exact(module: torch.fx.GraphModule) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return run_exact(module, x).logits

    return fn


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _onnx_input_spec(path: Path, opts: ModelOptions) -> InputSpec:
    """qcli writes its input spec into the file; a foreign ONNX model needs the flags."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise QcliError(f"'{path}' is not a readable ONNX model") from e
    props = {p.key: p.value for p in model.metadata_props}
    if "qcli_input_spec" in props:
        base = InputSpec.from_dict(json.loads(props["qcli_input_spec"]))
    else:  # a foreign file: ImageNet preprocessing at the size its graph input declares
        base = IMAGENET_SPEC.with_overrides({"size": _graph_input_size(model)})
    return base.with_overrides(opts.input_overrides)


def _graph_input_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(H, W) of a fixed-size NCHW graph input, else None."""
    consts = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in consts]
    if len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    hw = [d.dim_value if d.HasField("dim_value") else 0 for d in dims][2:]
    return (hw[0], hw[1]) if len(dims) == 4 and min(hw) > 0 else None


def evaluate(cfg: EvalConfig, ui: UI) -> dict[str, Any]:
    target = resolve_target(cfg.target, cfg.model, cfg.threads, ui, cfg.simulation)
    reference = (
        resolve_target(cfg.reference, cfg.model, cfg.threads, ui, cfg.simulation)
        if cfg.reference
        else None
    )
    if reference is not None and reference.input_spec.size != target.input_spec.size:
        raise QcliError(
            f"--reference '{cfg.reference}' expects {reference.input_spec.size} images but "
            f"'{cfg.target}' expects {target.input_spec.size}"
        )
    ds = open_dataset(cfg.data, target.input_spec, cfg.seed)
    result: dict[str, Any] = {"target": cfg.target, "kind": target.kind}
    for t, key in ((target, "simulation"), (reference, "reference_simulation")):
        if t is not None and t.kind == "qcli":
            result[key] = t.metadata["simulation"]
    fn = target.fn
    if target.kind == "onnx":
        result.update(_cpu_report(target.name, Path(cfg.target), target.metadata, ui))
        if cfg.kernel_check:
            fn = KernelCheck(target.fn, cfg.threads)
    with ui.task(f"evaluate {target.kind}", total=len(ds)) as advance:
        acc = accuracy(
            fn,
            iterate(ds, cfg.data.batch_size),
            reference_fn=reference.fn if reference else None,
            progress=advance,
        )
    result.update(acc.to_dict())
    _warn_suspicious(acc, cfg, ui, target.kind)
    if isinstance(fn, KernelCheck):
        result["kernel_check"] = fn.to_dict()
    result["skipped_images"] = report_skipped(ds, ui)
    if target.size_path is not None:
        result["bytes"] = file_size(target.size_path)
    if cfg.latency:
        shape = (3, *target.input_spec.size)
        with ui.task("latency", total=None):
            stats = latency(target.fn, shape, batch_sizes=(1, 64))
        result["latency_ms"] = {b: round(s.median * 1000, 3) for b, s in stats.items()}
    return result


# Below this many labelled images a score near chance says little about the labels.
CHANCE_MIN_IMAGES = 20


def _warn_suspicious(acc: Any, cfg: EvalConfig, ui: UI, kind: str = "model") -> None:
    """Numbers that are computed but cannot mean what they seem to."""
    if acc.max_label >= acc.classes > 0:
        ui.warn(
            f"labels of '{cfg.data.path}' go up to {acc.max_label} but '{cfg.target}' outputs "
            f"{acc.classes} classes: top-1 cannot be right (wrong data set or --class-list?)"
        )
    elif at_chance(acc):
        why = (
            "the folder labels probably are not the model's classes"
            if kind == "model"
            else "either the folder labels are not the model's classes or the model is broken "
            "(compare with the float model)"
        )
        ui.warn(
            f"'{cfg.target}' scores {acc.top1:.2f}% top-1 on '{cfg.data.path}', no better than "
            f"chance for {acc.classes} classes: {why}; --class-list FILE gives the model's "
            "class ids in output order (one per line)"
        )
    if acc.nonfinite_images:
        ui.warn(
            f"'{cfg.target}' gave NaN/Inf logits on {acc.nonfinite_images} of {acc.n_images} "
            "images: their predictions are meaningless"
        )


def at_chance(acc: Any) -> bool:
    """Top-1 on enough labelled images at most twice what guessing gets."""
    if acc.top1 is None or acc.n < CHANCE_MIN_IMAGES or acc.classes < 2:
        return False
    return acc.top1 <= 2 * 100.0 / acc.classes


def _cpu_report(name: str, path: Path, metadata: dict[str, str], ui: UI) -> dict[str, Any]:
    """This CPU's integer-kernel class, and whether the file can saturate int16 pair sums.

    The second is read from the file itself (a static property), so a file that would compute
    something else on an AVX2-only CPU is flagged on any CPU, foreign files included.
    """
    cpu = kernels.cpu_kernel_class()
    violations = kernels.pair_sum_violations(path)
    report: dict[str, Any] = {"cpu": cpu, "saturating_layers": len(violations)}
    if "qcli_exact_on" in metadata:
        report["exact_on"] = metadata["qcli_exact_on"].split(",")
    if violations:
        where = (
            f"on this CPU ({cpu}) onnxruntime's integer kernels compute something else"
            if kernels.saturates(cpu)
            else "exact on this CPU, but x86 CPUs without VNNI compute something else"
        )
        ui.warn(
            f"'{name}': {len(violations)} layer(s), e.g. '{violations[0].node}', can "
            f"saturate int16 pair sums of u8×s8 kernels: {where}; qcli's default "
            "--int8-range safe makes files that are exact on every CPU"
        )
    return report
