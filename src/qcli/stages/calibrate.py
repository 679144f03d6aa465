"""`qcli calibrate`: model + calibration data -> quantized-model folder (.qcli)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcli.artifacts import prepare_output
from qcli.methods.registry import CALIBRATION_METHODS, load_all
from qcli.quant.capture import QuantGraph, capture
from qcli.quant.spec import BitConfig
from qcli.stages.common import (
    DataOptions,
    ModelOptions,
    device,
    image_batches,
    open_dataset,
    report_skipped,
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
    settings: dict[str, Any] = field(default_factory=dict)


def calibrate(cfg: CalibrateConfig, ui: UI) -> dict[str, Any]:
    load_all()
    prepare_output(cfg.out, cfg.force)
    torch.manual_seed(cfg.seed)
    loaded = cfg.model.load()
    ds = open_dataset(cfg.data, loaded.input_spec, cfg.seed)
    qg = capture(loaded.module, (3, *loaded.input_spec.size), cfg.bits, cfg.keep_fp)
    qg.to(device())
    metrics = run_method(qg, cfg.method, ds, cfg.data.batch_size, cfg.settings, ui)
    skipped = report_skipped(ds, ui)
    qg.to("cpu")
    extra = {
        "method": {"name": cfg.method, "settings": cfg.settings},
        "calibration": {
            "data": str(cfg.data.path),
            "images": metrics.get("images"),
            "skipped": skipped,
            "seed": cfg.seed,
            "seconds": metrics.get("seconds"),
        },
        "metrics": metrics,
    }
    save_qmodel(cfg.out, qg, loaded, extra, cfg.force)
    return {
        "out": str(cfg.out),
        "model": loaded.name,
        "bits": str(cfg.bits),
        "method": cfg.method,
        "layers": sum(1 for _ in qg.layers()),
        "activation_quantizers": sum(1 for _ in qg.act_quantizers()),
        **{k: v for k, v in metrics.items() if k != "range_method"},
    }


def run_method(
    qg: QuantGraph, method: str, ds, batch_size: int, settings: dict[str, Any], ui: UI
) -> dict[str, Any]:
    """Run one registered calibration method on the data set, with a progress bar."""
    m = CALIBRATION_METHODS[method]
    start = time.perf_counter()
    with ui.task(f"calibrate ({method})", total=len(ds)) as advance:
        metrics = m.run(qg, image_batches(ds, batch_size), settings, advance)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics
