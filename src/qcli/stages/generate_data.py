"""`qcli generate-data`: a model's own statistics -> a calibration data-set folder."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcli import __version__
from qcli.artifacts import prepare_output, write_dataset
from qcli.methods.registry import DATA_METHODS, load_all
from qcli.stages.common import ModelOptions, device
from qcli.ui import UI


@dataclass(frozen=True)
class GenerateConfig:
    model: ModelOptions
    out: Path
    method: str = "bns"
    num_images: int = 256
    batch_size: int = 32
    iters: int = 200
    lr: float | None = None
    seed: int = 0
    force: bool = False


def generate(cfg: GenerateConfig, ui: UI) -> dict[str, Any]:
    load_all()
    from qcli.methods.bns import BnsSettings

    prepare_output(cfg.out, cfg.force)
    loaded = cfg.model.load()
    settings = BnsSettings(
        num_images=cfg.num_images,
        batch_size=cfg.batch_size,
        iters=cfg.iters,
        seed=cfg.seed,
        **({"lr": cfg.lr} if cfg.lr is not None else {}),
    )
    method = DATA_METHODS[cfg.method]
    steps = math.ceil(cfg.num_images / max(cfg.batch_size, 1)) * cfg.iters
    module = loaded.module.to(device())
    start = time.perf_counter()
    with ui.task(f"generate ({cfg.method})", total=steps if cfg.method != "noise" else None) as adv:
        images, metrics = method.run(module, loaded.input_spec, settings, _to_delta(adv))
    module.to("cpu")
    seconds = round(time.perf_counter() - start, 2)
    manifest = {
        "qcli_version": __version__,
        "method": cfg.method,
        "settings": {
            "num_images": cfg.num_images,
            "batch_size": cfg.batch_size,
            "iters": cfg.iters,
            "lr": settings.lr,
        },
        "seed": cfg.seed,
        "model": loaded.source.to_dict(),
        "model_checksum": loaded.checksum,
        "input_spec": loaded.input_spec.to_dict(),
        "metrics": {**metrics, "seconds": seconds},
    }
    write_dataset(cfg.out, images.to(torch.float32).cpu(), None, manifest, cfg.force)
    return {
        "out": str(cfg.out),
        "method": cfg.method,
        "images": int(images.shape[0]),
        "seconds": seconds,
        "images_per_second": round(images.shape[0] / max(seconds, 1e-9), 2),
        **{k: v for k, v in metrics.items() if k != "seconds"},
    }


def _to_delta(advance):
    """Methods report steps done so far; the progress bar wants increments."""
    done = 0

    def report(total_done: int) -> None:
        nonlocal done
        advance(total_done - done)
        done = total_done

    return report
