"""`qcli export`: .qcli folder -> ONNX QDQ file, checked against the simulation before it lands.

The ONNX file is written to a temporary sibling, checked with onnx.checker and run in
onnxruntime beside the PyTorch simulation; only a model that agrees replaces the output, so a
failed or interrupted export leaves the previous file intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from qcli.artifacts import atomic_file, prepare_output
from qcli.data import iterate, open_data
from qcli.errors import QcliError
from qcli.evaluate import OrtModel
from qcli.export.onnx_qdq import to_onnx
from qcli.stages.common import QModel, load_qmodel
from qcli.ui import UI

# onnxruntime's integer kernels requantize with float multipliers, so a value within float
# error of a rounding boundary can move by one step: small logit differences, never systematic
# ones. The export fails when the logits differ by more than this share of their range, or when
# top-1 flips on an image whose decision was clear (the simulation's margin between its class
# and onnxruntime's exceeds this share of the range). Flips between near-tied classes are
# reported, not fatal: generated calibration images often have such ties.
MAX_RELATIVE_ERROR = 0.10
DECISIVE_MARGIN = 0.05


@dataclass(frozen=True)
class ExportConfig:
    qmodel: Path
    out: Path
    check_data: Path | None = None
    check_images: int = 32
    force: bool = False
    seed: int = 0


def export(cfg: ExportConfig, ui: UI) -> dict[str, Any]:
    prepare_output(cfg.out, cfg.force)
    qm = load_qmodel(cfg.qmodel)
    model = to_onnx(qm.graph)
    _add_metadata(model, qm)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise QcliError(f"the exported model fails onnx.checker: {str(e).splitlines()[0]}") from e
    x = _check_inputs(cfg, qm)
    with atomic_file(cfg.out) as tmp:
        onnx.save(model, str(tmp))
        check = compare_with_simulation(qm, tmp, x)
        if not check["ok"]:
            raise QcliError(
                f"onnxruntime disagrees with the simulation: top-1 differs on "
                f"{check['disagreement_pct']:.1f}% of {check['images']} check images "
                f"({check['decisive_flips']} with a clear margin), max "
                f"|Δlogit| {check['max_abs_diff']:.3g} (logit range {check['logit_range']:.3g})"
            )
    opset = model.opset_import[0].version
    return {
        "out": str(cfg.out),
        "opset": opset,
        "bits": qm.manifest.get("bits"),
        "bytes": cfg.out.stat().st_size,
        "check": check,
    }


def _add_metadata(model: onnx.ModelProto, qm: QModel) -> None:
    """The input spec travels with the file so `qcli eval` can preprocess images for it."""
    props = {
        "qcli_input_spec": json.dumps(qm.input_spec.to_dict()),
        "qcli_source": json.dumps(qm.source.to_dict()),
        "qcli_method": json.dumps(qm.manifest.get("method", {})),
    }
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def _check_inputs(cfg: ExportConfig, qm: QModel) -> torch.Tensor:
    """Real images when we have them (the given folder, else the calibration data), else noise."""
    candidates = [cfg.check_data, qm.manifest.get("calibration", {}).get("data")]
    for path in candidates:
        if path and Path(path).is_dir():
            ds = open_data(path, qm.input_spec, limit=cfg.check_images, seed=cfg.seed)
            xs = [x for x, _ in iterate(ds, cfg.check_images)]
            if xs:
                return torch.cat(xs)
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(cfg.check_images, 3, *qm.input_spec.size, generator=g)


@torch.no_grad()
def compare_with_simulation(qm: QModel, onnx_path: Path, x: torch.Tensor) -> dict[str, Any]:
    sim = qm.graph.module.eval()(x)
    ort_out = torch.as_tensor(np.asarray(OrtModel(onnx_path)(x)))
    return agreement_report(sim, ort_out)


def agreement_report(sim: torch.Tensor, ort_out: torch.Tensor) -> dict[str, Any]:
    diff = float((ort_out - sim).abs().max())
    rng = float(sim.max() - sim.min()) or 1.0
    sim_top, ort_top = sim.argmax(1), ort_out.argmax(1)
    flipped = sim_top != ort_top
    margin = sim.gather(1, sim_top[:, None]) - sim.gather(1, ort_top[:, None])
    decisive = flipped & (margin[:, 0] > DECISIVE_MARGIN * rng)
    return {
        "images": int(sim.shape[0]),
        "disagreement_pct": 100 * float(flipped.float().mean()),
        "decisive_flips": int(decisive.sum()),
        "max_abs_diff": diff,
        "logit_range": rng,
        "ok": int(decisive.sum()) == 0 and diff <= MAX_RELATIVE_ERROR * rng,
    }
