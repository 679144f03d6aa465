"""`qcli qat`: a model or a calibrated .qcli + a labelled training folder -> a trained .qcli.

Starting from a .qcli keeps its plan and uses its calibrated step sizes as LSQ's
initialization; starting from a MODEL first runs MSE range setting (what `calibrate --method
mse` does) on `calib_images` training images. Under torchrun every process runs this same
function; only rank 0 writes the checkpoint, the output and the progress.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qcli import distributed
from qcli.artifacts import atomic_file, prepare_output
from qcli.data import ImageFolderSet, open_data
from qcli.errors import QcliError, UsageError
from qcli.methods.int8_range import narrowed_layers
from qcli.methods.qat import (
    EpochStats,
    QATSettings,
    Trainer,
    TrainImages,
    augmentation_for,
    freeze,
)
from qcli.methods.range_setting import fit_bias_grids
from qcli.models import LoadedModel
from qcli.quant.capture import QuantGraph, capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from qcli.stages.calibrate import run_method, widen
from qcli.stages.common import (
    ModelOptions,
    device,
    is_qmodel,
    load_qmodel,
    require_python_module,
    save_qmodel,
)
from qcli.ui import UI


@dataclass(frozen=True)
class QATConfig:
    model: ModelOptions  # a MODEL spec, or a .qcli folder as `model.spec`
    train_data: Path
    out: Path
    settings: QATSettings = field(default_factory=QATSettings)
    bits: BitConfig | None = None  # MODEL only; a .qcli keeps its plan
    keep_fp: tuple[str, ...] = ()
    int8_range: str = "safe"
    calib_images: int = 1024  # MODEL only: images for the initial range setting
    class_list: Path | None = None
    limit: int | None = None
    checkpoint: Path | None = None  # default: <out>.ckpt beside the output
    resume: bool = False
    force: bool = False

    @property
    def from_qmodel(self) -> bool:
        return is_qmodel(self.model.spec)

    def checkpoint_path(self) -> Path:
        return self.checkpoint or self.out.with_name(self.out.name + ".ckpt")


def qat(cfg: QATConfig, ui: UI) -> dict[str, Any]:
    comm = distributed.start(device())
    try:
        return _run(cfg, ui if comm.primary else UI(), comm)
    finally:
        distributed.stop(comm)


def _run(cfg: QATConfig, ui: UI, comm: distributed.Comm) -> dict[str, Any]:
    s = cfg.settings
    if cfg.from_qmodel and cfg.bits is not None:
        raise UsageError("--bits does not apply to a .qcli input: it keeps its own plan")
    if not cfg.from_qmodel and cfg.bits is None:
        raise UsageError("qat needs --bits when starting from a MODEL (e.g. --bits w4a4)")
    inputs = {**cfg.model.input_files(), "--train-data": cfg.train_data}
    prepare_output(cfg.out, cfg.force, inputs=inputs)
    ckpt = cfg.checkpoint_path()
    torch.manual_seed(s.seed)
    qg, loaded, start = _graph(cfg, ui)
    data, skipped = _train_images(cfg, loaded, ui)
    if s.augment == "auto":
        s = replace(s, augment=augmentation_for(loaded.input_spec.size))
    if not cfg.from_qmodel:
        _initial_ranges(qg, data, cfg, ui)
    qg.to(comm.device)  # NCCL broadcasts from the GPU
    comm.broadcast_module(qg.module)  # one initialization on every rank
    trainer = Trainer(qg, loaded.module, data, s, comm)
    if cfg.resume:
        _resume(trainer, ckpt, data, ui)

    def after_epoch(t: Trainer, e: EpochStats) -> None:
        if comm.primary:
            with atomic_file(ckpt) as tmp:
                torch.save(t.state_dict(), tmp)
        picked = f", coreset chosen in {e.score_s:.1f} s" if e.selected else ""
        ui.info(
            f"epoch {e.epoch}/{s.epochs}: loss {e.loss:.4f}, {e.coreset:,} images, "
            f"{e.train_s:.1f} s{picked}"
        )

    history = trainer.run(ui.task, after_epoch)
    freeze(qg)
    widened = fit_bias_grids(qg)
    qg.to("cpu")
    _epoch_table(history, ui)
    summary = _summary(cfg, s, qg, loaded, history, len(data), comm.world)
    if comm.primary:
        extra = {
            "method": {"name": "qat", "settings": asdict(s), "start": start},
            "calibration": {
                "data": os.path.abspath(cfg.train_data),
                "images": len(data),
                "skipped": skipped,
                "seed": s.seed,
                "seconds": summary["train_s"] + summary["score_s"],
            },
            "qat": {
                "processes": comm.world,
                "epochs": [asdict(h) for h in history],
                "bias_grid_channels_widened": widened,
            },
        }
        save_qmodel(cfg.out, qg, loaded, extra, cfg.force)
        ckpt.unlink(missing_ok=True)
    comm.barrier()
    return summary


def _graph(cfg: QATConfig, ui: UI) -> tuple[QuantGraph, LoadedModel, str]:
    """The graph to train, its float source model (the KD teacher), and what it started
    from."""
    if cfg.from_qmodel:
        qm = load_qmodel(Path(cfg.model.spec), cfg.model.weights)
        assert qm.loaded is not None
        method = qm.manifest.get("method", {}).get("name", "?")
        return qm.graph, qm.loaded, f"{cfg.model.spec} ({method})"
    loaded = cfg.model.load(ui)
    require_python_module(loaded, "train")
    plan = QuantPlan.uniform(cfg.bits, cfg.keep_fp, cfg.int8_range)
    qg = capture(loaded.module, (3, *loaded.input_spec.size), plan)
    return qg, loaded, "mse range setting"


def _train_images(cfg: QATConfig, loaded: LoadedModel, ui: UI) -> tuple[TrainImages, int]:
    s = cfg.settings
    ds = open_data(
        cfg.train_data,
        loaded.input_spec,
        class_list=cfg.class_list,
        limit=cfg.limit,
        seed=s.seed,
    )
    if not isinstance(ds, ImageFolderSet):
        raise UsageError(
            f"--train-data '{cfg.train_data}' is a data-set folder; qat trains on an image "
            "folder (one subfolder per class)"
        )
    if not ds.labelled and (s.coreset != "full" or not s.kd):
        need = "--no-kd" if s.coreset == "full" else f"--coreset {s.coreset}"
        raise UsageError(
            f"--train-data '{cfg.train_data}' has no class subfolders, so its images have no "
            f"labels, and {need} needs them; use an ImageFolder layout (DIR/<class>/<image>)"
        )
    with ui.task("decode training images", total=len(ds)) as advance:
        pixels, labels = ds.pixels(advance)
    if len(pixels) == 0:
        raise QcliError(f"--train-data '{cfg.train_data}' holds no readable images")
    if ds.skipped:
        path, reason = ds.skipped[0]
        ui.warn(f"skipped {len(ds.skipped)} unreadable image(s), e.g. '{path}' ({reason})")
    return TrainImages(pixels, labels, ds.transform.normalize), len(ds.skipped)


def _initial_ranges(qg: QuantGraph, data: TrainImages, cfg: QATConfig, ui: UI) -> None:
    """MSE range setting on the first `calib_images` images (seeded order), as `calibrate
    --method mse` sets it, with the int8 'safe' range's widening step."""
    g = torch.Generator().manual_seed(cfg.settings.seed)
    pick = torch.randperm(len(data), generator=g)[: cfg.calib_images]
    images = data.normalize(data.pixels[pick])
    bs = cfg.settings.batch_size
    qg.to(device())
    run_method(qg, "mse", images.split(bs), len(images), {}, ui)
    if narrowed_layers(qg):
        widen(qg, images[:256], "mse")
    qg.to("cpu")


def _resume(trainer: Trainer, ckpt: Path, data: TrainImages, ui: UI) -> None:
    if not ckpt.is_file():
        ui.warn(f"no checkpoint at '{ckpt}': starting from the first epoch")
        return
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QcliError(f"checkpoint '{ckpt}' cannot be read ({type(e).__name__})") from e
    if state.get("settings") != asdict(trainer.s):
        raise UsageError(
            f"checkpoint '{ckpt}' was written with other settings; resume with the same "
            "flags, or start over without --resume"
        )
    coreset = state.get("coreset")
    if coreset is not None and int(coreset.max()) >= len(data):
        raise UsageError(f"checkpoint '{ckpt}' was written for other training data")
    trainer.load_state_dict(state)
    ui.info(f"resuming after epoch {trainer.epoch} from '{ckpt}'")


def _epoch_table(history: list[EpochStats], ui: UI) -> None:
    rows = [
        (
            h.epoch,
            f"{h.loss:.4f}",
            h.coreset,
            "-" if h.beta is None else f"{h.beta:.3f}",
            f"{h.lr:.2e}",
            f"{h.train_s:.1f}",
            f"{h.score_s:.1f}" if h.selected else "-",
        )
        for h in history
    ]
    ui.table("qat epochs", ["epoch", "loss", "images", "β", "lr", "train s", "score s"], rows)


def _summary(
    cfg: QATConfig,
    s: QATSettings,
    qg: QuantGraph,
    loaded: LoadedModel,
    history: list[EpochStats],
    images: int,
    world: int,
) -> dict[str, Any]:
    return {
        "out": str(cfg.out),
        "model": loaded.name,
        "bits": qg.base_plan.describe(),
        "coreset": s.coreset if s.coreset == "full" else f"{s.coreset} {s.fraction:g}",
        "epochs": s.epochs,
        "images": images,
        "processes": world,
        "loss_first": history[0].loss if history else None,
        "loss_last": history[-1].loss if history else None,
        "train_s": round(sum(h.train_s for h in history), 1),
        "score_s": round(sum(h.score_s for h in history), 1),
        "fingerprints": [h.fingerprints for h in history if h.selected],
        "history": [asdict(h) for h in history],
    }
