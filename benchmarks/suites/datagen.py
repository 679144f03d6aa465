"""datagen: calibration images from the model alone, against real images (BENCHMARKS.md §2).

For each model: real images, DGH, DGH without each of its parts, bns (per-batch BN matching,
ZeroQ-style) and Gaussian noise, the same number of images each, then the same calibration
(MSE range setting) at each bit width, scored by the PyTorch simulation's top-1. Beside it:
generation time and speed, the BN loss of each image set as a whole, preview grids, and the
peak memory of DGH at two set sizes with the same batch size (each in a fresh process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qcli.artifacts import read_dataset, write_dataset
from qcli.artifacts.preview import write_preview
from qcli.data import iterate, open_data
from qcli.methods.generators.bn_stats import set_bn_loss
from qcli.methods.generators.noise import NoiseSettings, generate_noise
from qcli.quant.spec import BitConfig
from qcli.stages.calibrate import CalibrateConfig, calibrate
from qcli.stages.common import DataOptions
from qcli.stages.generate_data import GenerateConfig, generate
from qcli.ui import SilentUI
from suites.common import (
    BENCH,
    CACHE,
    REPO,
    SPLIT_SEED,
    Bench,
    Context,
    benches,
    cache_key,
    drop,
    fmt,
    header_lines,
    loadavg,
    log,
    md_table,
    qcli_artifact,
    score_fp,
    score_sim,
)

CALIBRATION = "mse"  # one range-setting method for every row: only the images change
GRIDS = BENCH / "datagen"
# The code that makes the images: generated sets are cached by it, not by all of src/.
GENERATOR_FILES = ("methods/generators", "stages/generate_data.py")


@dataclass(frozen=True)
class Source:
    key: str
    label: str
    method: str | None  # None: real images
    options: dict[str, Any] = field(default_factory=dict)
    size: dict[str, Any] = field(default_factory=dict)  # overrides the preset's N, B, iters


SOURCES = [
    Source("real", "real images", None),
    Source("dgh", "DGH", "dgh"),
    Source("dgh-no-aggregate", "DGH − aggregation (per-batch stats)", "dgh", {"aggregate": False}),
    Source("dgh-no-augment", "DGH − augmentation/smoothing", "dgh", {"augment": False}),
    Source("dgh-no-output-loss", "DGH − output loss", "dgh", {"output_loss": False}),
    Source("bns", "bns (per-batch BN, ZeroQ-style)", "bns"),
    Source("noise", "Gaussian noise", "noise"),
    Source(
        "dgh-demo",
        "DGH, `qcli quantize` default (32 images, batch 16, 50 iters)",
        "dgh",
        size={"num_images": 32, "batch_size": 16, "iters": 50},
    ),
]


@dataclass(frozen=True)
class Preset:
    num_images: int
    batch_size: int
    iters: int | None  # None: the method's default
    bits: tuple[str, ...]
    sources: tuple[str, ...]


TABLE = tuple(s.key for s in SOURCES if not s.size)
PRESETS = {
    "r20": Preset(256, 32, None, ("w8a8", "w4a8", "w4a4"), TABLE),
    "effl0": Preset(64, 16, 40, ("w8a8", "w4a8"), (*TABLE, "dgh-demo")),
}
QUICK = {"r20": Preset(64, 32, 20, ("w8a8", "w4a8"), ("real", "dgh", "bns", "noise"))}
RSS_SIZES = (256, 2048)  # r20, batch 32, 2 iterations: memory, not quality
# Other draws of the two sources that cost nothing to redraw (real subsets, noise): how far a
# cell moves with the calibration sample alone, the yardstick for every gap in the table.
SPREAD_SEEDS = (1, 2)
# A second, data-hungry calibration on the cells where range setting alone collapses: MSE plus
# BN tuning (each conv's output statistics re-estimated on the calibration images).
BN_TUNE_BITS = {"r20": ("w4a4",), "effl0": ("w4a8",)}


def run(ctx: Context) -> dict[str, Any]:
    presets = QUICK if ctx.quick else PRESETS
    models: dict[str, Any] = {}
    for b in benches(ctx, list(presets)):
        models[b.key] = _model(ctx, b, presets[b.key])
    memory = [] if ctx.quick else _memory(ctx)
    spread, bn_tune = {}, {}
    if not ctx.quick:
        spread = {b.key: _spread(ctx, b, PRESETS[b.key]) for b in benches(ctx, ["r20"])}
        bn_tune = {b.key: _bn_tuned(ctx, b, PRESETS[b.key]) for b in benches(ctx, list(PRESETS))}
    return {
        "calibration": CALIBRATION,
        "sources": [dataclasses.asdict(s) for s in SOURCES],
        "models": models,
        "memory": memory,
        "spread": spread,
        "bn_tune": bn_tune,
    }


def _model(ctx: Context, b: Bench, preset: Preset) -> dict[str, Any]:
    log(f"datagen {b.key}: float model")
    fp = score_fp(ctx, b)
    rows = []
    for source in (s for s in SOURCES if s.key in preset.sources):
        data, gen = _images(ctx, b, source, preset)
        row = {"source": source.key, "label": source.label, "generation": gen, "cells": []}
        for bits in preset.bits:
            art = qcli_artifact(ctx, dataclasses.replace(b, calib=data), CALIBRATION, bits)
            sim = score_sim(ctx, b, art.qmodel)
            row["cells"].append({"bits": bits, "sim": sim.to_dict(), "calibrate": art.info})
            log(f"datagen {b.key} {source.key} {bits}: top-1 {sim.top1:.2f}")
        rows.append(row)
    return {
        "model": b.model.spec,
        "evaluation": b.eval_desc,
        "preset": dataclasses.asdict(preset),
        "fp": fp.to_dict(),
        "rows": rows,
    }


def _images(ctx: Context, b: Bench, source: Source, p: Preset) -> tuple[DataOptions, dict]:
    """The calibration images of one source (generated once per generator code and settings)."""
    if source.method is None:
        data = dataclasses.replace(b.calib, limit=p.num_images, batch_size=32)
        ds = open_data(data.path, b.loaded().input_spec, limit=p.num_images, seed=SPLIT_SEED)
        images = torch.cat([x for x, _ in iterate(ds, 64)])
        info = {"desc": f"{b.calib_desc}, seeded subset of {p.num_images}"}
        return data, {**info, **_describe(ctx, b, source, images)}
    settings = {"num_images": p.num_images, "batch_size": p.batch_size, "iters": p.iters}
    settings.update(source.size)
    key = _gen_key(b, source, settings)
    out = CACHE / "datagen" / f"{b.key}-{source.key}-{key}"
    info_file = out.with_suffix(".json")
    if ctx.use_cache and info_file.is_file() and out.is_dir():
        info = {**json.loads(info_file.read_text()), "cached": True}
    else:
        log(f"datagen {b.key}: generating {source.key} ({settings})")
        cfg = GenerateConfig(
            b.model,
            out,
            source.method,
            settings["num_images"],
            settings["batch_size"],
            settings["iters"],
            seed=SPLIT_SEED,
            force=True,
            options=source.options,
        )
        la0 = loadavg()
        res = generate(cfg, SilentUI())
        info = {"result": res, "loadavg": [la0, loadavg()], "cached": False}
        info_file.write_text(json.dumps(info, indent=2, default=str))
        log(f"datagen {b.key} {source.key}: {res['seconds']} s, {res['images_per_second']} img/s")
    images = read_dataset(out).images
    info.update(_describe(ctx, b, source, images))
    return DataOptions(out, batch_size=32), info


def _describe(ctx: Context, b: Bench, source: Source, images: torch.Tensor) -> dict[str, Any]:
    """The set's BN loss (the statistic every generator chases) and its preview grid."""
    module = b.loaded().module
    spec = b.loaded().input_spec
    grid = (CACHE / "datagen-quick" if ctx.quick else GRIDS) / f"{b.key}-{source.key}.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    shown = images[:16] if images.shape[-1] > 64 else images[:64]
    if shown.shape[-1] > 112:  # keep committed pictures small: 16 images at 112x112
        shown = F.interpolate(shown, size=(112, 112), mode="area")
    write_preview(grid, shown, spec.mean, spec.std)
    return {
        "set_bn_loss": set_bn_loss(module, images, 32),
        "grid": str(grid.relative_to(BENCH)),  # relative to benchmarks/, as the .md links
    }


def _gen_key(b: Bench, source: Source, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in GENERATOR_FILES:
        path = REPO / "src" / "qcli" / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(file.read_bytes())
    text = json.dumps(
        {"model": b.model.spec, "weights": b.model.weights, "options": source.options, **settings},
        sort_keys=True,
    )
    h.update(text.encode())
    return h.hexdigest()[:12]


def _spread(ctx: Context, b: Bench, p: Preset) -> list[dict[str, Any]]:
    """Top-1 for other seeded draws of real images and of noise (same N, same calibration)."""
    rows = []
    for source, seed in [(s, k) for s in ("real", "noise") for k in SPREAD_SEEDS]:
        data = _redraw(b, source, p.num_images, seed)
        cells = []
        for bits in p.bits:
            art = qcli_artifact(ctx, dataclasses.replace(b, calib=data), CALIBRATION, bits)
            cells.append({"bits": bits, "top1": score_sim(ctx, b, art.qmodel).top1})
        rows.append({"source": source, "seed": seed, "cells": cells})
        log(f"datagen {b.key} spread {source} seed {seed}: {cells}")
    return rows


def _bn_tuned(ctx: Context, b: Bench, p: Preset) -> list[dict[str, Any]]:
    """MSE + BN tuning on every source's images (already generated and cached)."""
    rows = []
    for source in (s for s in SOURCES if s.key in p.sources):
        data, _ = _images(ctx, b, source, p)
        for bits in BN_TUNE_BITS[b.key]:
            qmodel = _calibrate_bn_tuned(ctx, b, data, bits)
            top1 = score_sim(ctx, b, qmodel).top1
            rows.append({"source": source.key, "bits": bits, "top1": top1})
            log(f"datagen {b.key} {source.key} {bits} + BN tuning: top-1 {top1:.2f}")
    return rows


def _calibrate_bn_tuned(ctx: Context, b: Bench, data: DataOptions, bits: str) -> Path:
    key = cache_key(model=b.key, calib=str(data), bits=bits, bn_tune=True)
    out = ctx.key_dir(b.key, f"{CALIBRATION}-bntune-{bits}-{key}", "model.qcli")
    if not (ctx.use_cache and (out / "manifest.json").is_file()):
        out.parent.mkdir(parents=True, exist_ok=True)
        cfg = CalibrateConfig(
            b.model, data, out, BitConfig.parse(bits), CALIBRATION, force=True, bn_tune=True
        )
        calibrate(cfg, SilentUI())
    return out


def _redraw(b: Bench, source: str, n: int, seed: int) -> DataOptions:
    """A data-set folder holding seed `seed`'s draw of real images or of noise."""
    out = CACHE / "datagen" / f"{b.key}-{source}-draw-n{n}-s{seed}"
    if not (out / "manifest.json").is_file():
        spec = b.loaded().input_spec
        if source == "real":
            ds = open_data(b.calib.path, spec, limit=n, seed=seed)
            images = torch.cat([x for x, _ in iterate(ds, 64)])
        else:
            settings = NoiseSettings(num_images=n, batch_size=32, seed=seed)
            images, _ = generate_noise(None, spec, settings)
        manifest = {"method": source, "seed": seed, "input_spec": spec.to_dict()}
        write_dataset(out, images, None, manifest, force=True)
    return DataOptions(out, batch_size=32)


# -- memory --------------------------------------------------------------------------------


def _memory(ctx: Context) -> list[dict[str, Any]]:
    """Peak RSS of DGH on r20 at N = 256 and 2048, batch 32, each in a fresh process."""
    rows = []
    weights = str(ctx.data.parent / "models" / "resnet20_cifar10.th")
    for n in RSS_SIZES:
        spec = {
            "model": "builtin:resnet20_cifar10",
            "weights": weights,
            "method": "dgh",
            "settings": {"num_images": n, "batch_size": 32, "iters": 2},
        }
        worker = Path(__file__).with_name("datagen_worker.py")
        la0 = loadavg()
        out = subprocess.run(
            [sys.executable, str(worker), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if out.returncode != 0:
            rows.append({"num_images": n, "error": out.stderr[-2000:]})
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"num_images": n, "batch_size": 32, "loadavg": la0, **res})
        log(f"datagen memory N={n}: peak RSS {res['peak_rss_mb']} MB")
    return rows


# -- tables --------------------------------------------------------------------------------


def markdown(payload: dict[str, Any]) -> str:
    out = ["# datagen: calibration images from the model alone, against real images", ""]
    out += header_lines(payload)
    out += [
        "",
        f"Every row calibrates with the same method ({payload['calibration']}: MSE range "
        "setting, weights per-channel, activations per-tensor, every layer quantized) on the "
        "same number of images; only the images differ. Cells: top-1 (%) of the PyTorch "
        "simulation on the evaluation images and, in brackets, the gap to real images in "
        "points. 'set BN loss': the BN-statistics loss of the image set as a whole (what a "
        "BN layer would have collected had these images been its training set; lower is "
        "closer). Generation ran with one torch thread.",
    ]
    if payload.get("notes"):  # written beside the numbers by whoever read them
        out += ["", "## Reading this run", "", *[f"- {n}" for n in payload["notes"]]]
    for key, m in payload["models"].items():
        out += _model_md(key, m)
    for key, rows in payload.get("bn_tune", {}).items():
        out += _bn_tune_md(key, rows, payload["models"].get(key))
    for key, rows in payload.get("spread", {}).items():
        out += _spread_md(key, rows, payload["models"].get(key))
    if payload.get("memory"):
        out += _memory_md(payload["memory"])
    return "\n".join(out)


def _model_md(key: str, m: dict[str, Any]) -> list[str]:
    p = m["preset"]
    fp = m["fp"]["top1"]
    bits = list(p["bits"])
    out = ["", f"## {key} (`{m['model']}`)", ""]
    iters = p["iters"] if p["iters"] is not None else "default"
    out.append(
        f"{p['num_images']} images per source (generated in batches of {p['batch_size']}, "
        f"{iters} iterations). Evaluation: {m['evaluation']}. FP32 top-1 {fp:.2f}."
    )
    out.append("")
    real = _top1(m, "real")
    header = ["source", *[b.upper() for b in bits], "set BN loss", "gen. s", "img/s", "grid"]
    rows = []
    for r in m["rows"]:
        cells = []
        for c in r["cells"]:
            t = c["sim"]["top1"]
            ref = real.get(c["bits"])
            gap = "" if r["source"] == "real" or ref is None else f" ({drop(t, ref)})"
            cells.append(f"{t:.2f}{gap}")
        g = r["generation"]
        res = g.get("result", {})
        grid = f"[png]({g['grid']})" if g.get("grid") else ""
        rows.append(
            [
                r["label"],
                *cells,
                fmt(g.get("set_bn_loss"), 4),
                res.get("seconds", "—"),
                res.get("images_per_second", "—") if r["source"] != "noise" else "—",
                grid,
            ]
        )
    out.append(md_table(header, rows))
    out += ["", *_ablation_lines(m, bits)]
    return out


def _top1(m: dict[str, Any], source: str) -> dict[str, float]:
    for r in m["rows"]:
        if r["source"] == source:
            return {c["bits"]: c["sim"]["top1"] for c in r["cells"]}
    return {}


def _ablation_lines(m: dict[str, Any], bits: list[str]) -> list[str]:
    """What removing each part did, averaged over the bit widths (negative: the part helps)."""
    dgh = _top1(m, "dgh")
    if not dgh:
        return []
    lines = []
    for source in ("dgh-no-aggregate", "dgh-no-augment", "dgh-no-output-loss", "bns", "noise"):
        other = _top1(m, source)
        if not other:
            continue
        deltas = [other[b] - dgh[b] for b in bits if b in other]
        per = ", ".join(f"{b.upper()} {_signed(other[b] - dgh[b])}" for b in bits if b in other)
        mean = sum(deltas) / len(deltas)
        lines.append(f"- {source} vs DGH: {per} (mean {_signed(mean)} points)")
    return ["Against DGH (points; negative means DGH is better):", "", *lines]


def _bn_tune_md(key: str, rows: list[dict[str, Any]], m: dict[str, Any] | None) -> list[str]:
    if not rows or m is None:
        return []
    labels = {r["source"]: r["label"] for r in m["rows"]}
    bits = sorted({r["bits"] for r in rows})
    real = {r["bits"]: r["top1"] for r in rows if r["source"] == "real"}
    table = []
    for source in dict.fromkeys(r["source"] for r in rows):
        cells = {r["bits"]: r["top1"] for r in rows if r["source"] == source}
        gaps = ["" if source == "real" else f" ({drop(cells[b], real[b])})" for b in bits]
        table.append(
            [
                labels.get(source, source),
                *[f"{cells[b]:.2f}{g}" for b, g in zip(bits, gaps, strict=True)],
            ]
        )
    return [
        "",
        f"## {key}: the same images, calibrated with MSE + BN tuning",
        "",
        "Range setting alone barely reads the images; BN tuning (`--bn-tune`: each conv's "
        "per-channel output statistics re-estimated on the calibration images and refolded) "
        "depends on them directly, so this is where the source of the images shows.",
        "",
        md_table(["source", *[f"{b.upper()} + BN tuning" for b in bits]], table),
    ]


def _spread_md(key: str, rows: list[dict[str, Any]], m: dict[str, Any] | None) -> list[str]:
    """Seed 0 (the table's draw) beside other draws of the same sources."""
    if not rows or m is None:
        return []
    bits = [c["bits"] for c in rows[0]["cells"]]
    table = []
    for source in ("real", "noise"):
        seed0 = _top1(m, source)
        draws = [r for r in rows if r["source"] == source]
        for r in [{"seed": 0, "cells": [{"bits": b, "top1": seed0.get(b)} for b in bits]}, *draws]:
            table.append([source, r["seed"], *[c["top1"] for c in r["cells"]]])
    return [
        "",
        f"## {key}: how much a cell moves with the calibration sample alone",
        "",
        "Other seeded draws of the two sources that are free to redraw (a different subset of "
        "real images; other noise), same N and calibration. A gap in the table smaller than "
        "the spread here is not a difference between sources.",
        "",
        md_table(["source", "draw (seed)", *[b.upper() for b in bits]], table),
    ]


def _signed(v: float) -> str:
    return f"{v:+.2f}".replace("-", "−")


def _memory_md(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", "## Peak memory (r20, DGH, batch 32, 2 iterations, fresh process each)", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["num_images"], "error", "", "", ""])
            continue
        table.append(
            [
                r["num_images"],
                r["peak_rss_before_mb"],
                r["peak_rss_mb"],
                r["images_mb"],
                r["seconds"],
            ]
        )
    out.append(md_table(["N", "peak RSS before (MB)", "peak RSS (MB)", "images (MB)", "s"], table))
    ok = [r for r in rows if "error" not in r]
    if len(ok) == 2:
        grow = ok[1]["peak_rss_mb"] - ok[0]["peak_rss_mb"]
        extra = ok[1]["metrics"]["extra_pixels"]
        n = ok[1]["num_images"] - ok[0]["num_images"]
        # per extra image: the optimized tensor at (32+extra)^2 and RAdam's two moments of it,
        # plus its 32x32 output
        state = n * 3 * 4 * (3 * (32 + extra) ** 2 + 32 * 32) / 2**20
        out += [
            "",
            f"Growth from N={ok[0]['num_images']} to N={ok[1]['num_images']}: {grow:.1f} MB; "
            f"the N={ok[1]['num_images']} images themselves are {ok[1]['images_mb']} MB. "
            f"The {n} extra images' optimization state (each kept at {32 + extra}x{32 + extra} "
            f"with RAdam's two moments, plus the output) is {state:.1f} MB: the growth is that "
            "state, not activations, which batch size alone bounds.",
        ]
    return out
