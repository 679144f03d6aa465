"""`qcli generate-data`: a model's own statistics -> a calibration data-set folder."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcli import __version__
from qcli.artifacts import prepare_output, write_dataset
from qcli.artifacts.preview import write_preview
from qcli.errors import QcliError, UsageError
from qcli.methods.registry import DATA_METHODS, data_flags, load_all
from qcli.stages.common import ModelOptions, device, require_python_module
from qcli.ui import UI

DEFAULT_METHOD = "dgh"


@dataclass(frozen=True)
class GenerateConfig:
    model: ModelOptions
    out: Path
    method: str = DEFAULT_METHOD
    num_images: int = 256
    batch_size: int = 32
    iters: int | None = None  # None: the method's own default
    lr: float | None = None  # None: the method's own default
    seed: int = 0
    force: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # method-specific settings
    preview: Path | None = None


# The command's generic flags; a generator's own come with its settings (`setting`).
GENERIC_FLAGS = {"iters": "--iters", "lr": "--lr"}


def method_settings(cfg: GenerateConfig) -> Any:
    """The method's settings dataclass filled from the config; options it lacks are refused."""
    load_all()
    if cfg.method not in DATA_METHODS:
        raise UsageError(f"unknown --method {cfg.method!r}; choose from {sorted(DATA_METHODS)}")
    cls = DATA_METHODS[cfg.method].settings
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in {"iters": cfg.iters, "lr": cfg.lr}.items() if v is not None}
    flags = {**GENERIC_FLAGS, **{k: f.flag for k, f in data_flags().items()}}
    unknown = [flags.get(k, k) for k in [*given, *cfg.options] if k not in names]
    if unknown:
        verb = "does" if len(unknown) == 1 else "do"
        raise UsageError(f"{', '.join(unknown)} {verb} not apply to --method {cfg.method}")
    settings = cls(
        num_images=cfg.num_images,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        **given,
        **cfg.options,
    )
    settings.validate()
    return settings


def generate(cfg: GenerateConfig, ui: UI) -> dict[str, Any]:
    settings = method_settings(cfg)  # bad flags fail before any file or model is touched
    method = DATA_METHODS[cfg.method]
    inputs = cfg.model.input_files()
    prepare_output(cfg.out, cfg.force, inputs=inputs)
    if cfg.preview is not None:
        prepare_output(cfg.preview, cfg.force, inputs=inputs, flag="--preview")
    loaded = cfg.model.load(ui)
    if method.uses_model:
        require_python_module(loaded, "generate data from")
    module = loaded.module.to(device())
    steps = method.total(settings) if method.total else None
    start = time.perf_counter()
    with ui.task(f"generate ({cfg.method})", total=steps) as adv:
        images, metrics = method.run(module, loaded.input_spec, settings, _to_delta(adv))
    module.to("cpu")
    elapsed = time.perf_counter() - start
    seconds = round(elapsed, 2)
    manifest = {
        "qcli_version": __version__,
        "method": cfg.method,
        "settings": dataclasses.asdict(settings),
        "seed": cfg.seed,
        "model": loaded.source.to_dict(),
        "model_checksum": loaded.checksum,
        "input_spec": loaded.input_spec.to_dict(),
        "metrics": {**metrics, "seconds": seconds},
    }
    images = images.to(torch.float32).cpu()
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if bad:
        raise QcliError(
            f"generation diverged: {bad} of {images.shape[0]} images hold NaN/Inf values "
            f"({cfg.method}); try a lower --lr; nothing was written"
        )
    write_dataset(cfg.out, images, None, manifest, cfg.force)
    result = {
        "out": str(cfg.out),
        "method": cfg.method,
        "images": int(images.shape[0]),
        "seconds": seconds,
        "images_per_second": round(images.shape[0] / max(elapsed, 1e-6), 2),
        **{k: v for k, v in metrics.items() if k != "seconds"},
    }
    if cfg.preview is not None:
        spec = loaded.input_spec
        result["preview"] = str(write_preview(cfg.preview, images, spec.mean, spec.std))
    return result


def _to_delta(advance):
    """Methods report steps done so far; the progress bar wants increments."""
    done = 0

    def report(total_done: int) -> None:
        nonlocal done
        advance(total_done - done)
        done = total_done

    return report
