"""ptq: post-training quantization methods × bit widths, top-1 of the exported ONNX in
onnxruntime against the float model's own top-1 on the same images.

Rows are `Row(label, method, settings)` entries: a new calibration method (AdaRound, BRECQ,
...) is one more entry in ROWS, with any settings it takes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qcli.artifacts.plot import write_loss_plot
from suites.common import (
    Context,
    benches,
    differ_pct,
    drop,
    fmt,
    header_lines,
    log,
    md_table,
    qcli_artifact,
    score_fp,
    score_ort,
    score_sim,
    write_partial,
)


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    # bit widths per model this row runs at (None: all of BITS); reconstruction on a 2-core
    # CPU is rationed to the cells where it matters
    only: dict[str, tuple[str, ...]] | None = None


RECON = ("adaround", "adaquant", "brecq", "qdrop")
# Iterations per unit and batch on this CPU (the papers: 10k-20k iterations of 32 on a GPU);
# the iterations table below shows what more buys.
RECON_SETTINGS = {"r20": {"iters": 200}, "effl0": {"iters": 100, "batch_size": 16}}
HARD = ("w4a4", "w3a3", "w2a4")
MRECG_CELLS = {"r20": HARD, "effl0": ("w4a8", "w4a4")}
# Oscillation plots: each MRECG row beside its base row, per model and bit width.
MRECG_PAIRS = {
    "MRECG+QDrop + BN tuning": "QDrop + BN tuning",
    "MRECG+BRECQ + BN tuning": "BRECQ + BN tuning",
}
PLOTS = Path(__file__).resolve().parents[1]

# Ordered so the cells that matter most run first (a run cut short keeps them).
ROWS = [
    Row(
        "QDrop + BN tuning",
        "qdrop",
        {"bn_tune": True},
        only={"r20": HARD, "effl0": ("w4a8", "w4a4")},
    ),
    Row(
        "QDrop + BN tuning + MetaAug",
        "qdrop",
        {"bn_tune": True, "metaaug": True},
        only={"r20": HARD, "effl0": ("w4a8", "w4a4")},
    ),
    # MRECG (merged block pairs, loss capacity, default merges) beside its base methods at
    # equal iterations per unit; its base pass adds `capacity_iters` per block on top.
    Row(
        "MRECG+QDrop + BN tuning",
        "qdrop",
        {"bn_tune": True, "granularity": "mrecg"},
        only=MRECG_CELLS,
    ),
    Row("BRECQ + BN tuning", "brecq", {"bn_tune": True}, only=MRECG_CELLS),
    Row(
        "MRECG+BRECQ + BN tuning",
        "brecq",
        {"bn_tune": True, "granularity": "mrecg"},
        only=MRECG_CELLS,
    ),
    Row(
        "MRECG+QDrop + BN tuning + MetaAug",
        "qdrop",
        {"bn_tune": True, "granularity": "mrecg", "metaaug": True},
        only=MRECG_CELLS,
    ),
    Row(
        "MRECG+BRECQ + BN tuning + MetaAug",
        "brecq",
        {"bn_tune": True, "granularity": "mrecg", "metaaug": True},
        only=MRECG_CELLS,
    ),
    Row("QDrop", "qdrop", only={"r20": ("w4a8", "w4a4", "w2a4")}),
    Row("AdaRound", "adaround", only={"r20": ("w4a4", "w2a4"), "effl0": ("w4a8",)}),
    Row("AdaQuant", "adaquant", only={"r20": ("w4a4",)}),
    Row("AdaQuant + BN tuning", "adaquant", {"bn_tune": True}, only={"r20": ("w4a4",)}),
    Row("BRECQ", "brecq", only={"r20": ("w4a4",)}),
    Row("BRECQ + MetaAug", "brecq", {"metaaug": True}, only={"r20": ("w4a4",)}),
    Row("MSE", "mse"),
    Row(
        "MSE + BN tuning",
        "mse",
        {"bn_tune": True},
        only={"r20": HARD, "effl0": ("w8a8", "w4a8", "w4a4")},
    ),
    Row("MSE + bias tuning", "mse", {"bias_tune": True}, only={"r20": ("w4a4",)}),
    Row("min-max", "minmax", only={"r20": ("w8a8", "w4a8", "w4a4"), "effl0": ("w8a8", "w4a8")}),
    Row("percentile", "percentile", only={"r20": ("w8a8", "w4a4"), "effl0": ("w8a8",)}),
]
BITS = {"r20": ["w8a8", "w4a8", "w4a4", "w3a3", "w2a4"], "effl0": ["w8a8", "w4a8", "w4a4"]}
# Iterations-vs-accuracy trade-off: QDrop on r20 W4A4.
SWEEP = {"model": "r20", "method": "qdrop", "bits": "w4a4", "iters": [50, 200, 500]}

# Calibration-vs-held-out gap with a small calibration set (MetaAug's claim): QDrop + BN
# tuning with and without MetaAug, equal reconstruction iterations.
GAP = {"r20": {"images": 128, "bits": ("w4a4", "w2a4")}, "effl0": {"images": 50, "bits": ("w4a4",)}}
GAP_ROWS = [
    Row("QDrop + BN tuning", "qdrop", {"bn_tune": True}),
    Row("QDrop + BN tuning + MetaAug", "qdrop", {"bn_tune": True, "metaaug": True}),
]

QUICK_ROWS = [Row("MSE", "mse"), Row("QDrop", "qdrop", {"iters": 20})]
QUICK_BITS = {"r20": ["w4a4"]}
QUICK_SWEEP = {**SWEEP, "iters": [10, 40]}


def _settings(row: Row, key: str) -> dict[str, Any]:
    if row.method in RECON:
        return {**RECON_SETTINGS[key], **row.settings}
    return dict(row.settings)


def run(ctx: Context) -> dict[str, Any]:
    rows = QUICK_ROWS if ctx.quick else ROWS
    bits_of = QUICK_BITS if ctx.quick else BITS
    models: dict[str, Any] = {}
    for b in benches(ctx, list(bits_of)):
        log(f"ptq {b.key}: float model")
        fp = score_fp(ctx, b)
        log(f"ptq {b.key}: FP top-1 {fp.top1:.2f} on {fp.n} images")
        cells = []
        for row in (r for r in rows if ctx.wants(r.label)):
            for bits in bits_of[b.key]:
                if not ctx.wants_bits(bits):
                    continue
                if row.only is None or bits in row.only.get(b.key, ()):
                    cells.append(_cell(ctx, b, row, bits, fp.top1, _settings(row, b.key)))
                    partial = {"models": {**models, b.key: {"fp": fp.to_dict(), "cells": cells}}}
                    write_partial(ctx, partial)
        if not ctx.quick and b.key in GAP and any(ctx.wants(f"gap: {r.label}") for r in GAP_ROWS):
            models[b.key + "_gap"] = _gap(ctx, b)
        if not ctx.quick:
            _oscillation_plots(b.key, cells)
        sweep = QUICK_SWEEP if ctx.quick else SWEEP
        if sweep["model"] == b.key and ctx.rows is None and ctx.bits is None:
            models[b.key + "_sweep"] = _sweep(ctx, b, sweep, fp.top1)
        models[b.key] = {
            "model": b.model.spec,
            "calibration": b.calib_desc,
            "evaluation": b.eval_desc,
            "fp": fp.to_dict(),
            "bits": bits_of[b.key],
            "cells": cells,
        }
    sweeps = {k.removesuffix("_sweep"): models.pop(k) for k in list(models) if k.endswith("_sweep")}
    gaps = {k.removesuffix("_gap"): models.pop(k) for k in list(models) if k.endswith("_gap")}
    return {"rows": [r.__dict__ for r in rows], "models": models, "sweeps": sweeps, "gaps": gaps}


def _gap(ctx: Context, b) -> dict[str, Any]:
    """Top-1 on the (small) calibration set itself and on the held-out images, per row."""
    n = GAP[b.key]["images"]
    small = replace(b, calib=replace(b.calib, limit=n), _eval=None)
    small.calib_desc = f"{n} of {b.calib_desc}"
    # the calibration images as an evaluation set: the same seeded subset calibrate draws
    on_calib = replace(small, eval_path=small.calib.path, eval_limit=n, _eval=None)
    on_calib.eval_desc = f"the {n} calibration images"
    cells = []
    for bits in (w for w in GAP[b.key]["bits"] if ctx.wants_bits(w)):
        for row in (r for r in GAP_ROWS if ctx.wants(f"gap: {r.label}")):
            settings = _settings(row, b.key)
            art = qcli_artifact(ctx, small, row.method, bits, settings)
            cell = {"row": row.label, "bits": bits, "settings": settings, "info": art.info}
            if art.onnx is not None:
                cell["calib"] = score_ort(ctx, on_calib, art.onnx).to_dict()
                cell["held_out"] = score_ort(ctx, small, art.onnx).to_dict()
                cell["gap"] = cell["calib"]["top1"] - cell["held_out"]["top1"]
            cells.append(cell)
            log(f"ptq gap {b.key} {row.label} {bits}: {cell.get('calib')} / {cell.get('held_out')}")
    return {
        "images": n,
        "fp_calib": score_fp(ctx, on_calib).top1,
        "fp_held_out": score_fp(ctx, small).top1,
        "evaluation": small.eval_desc,
        "cells": cells,
    }


def _sweep(ctx: Context, b, sweep: dict[str, Any], fp_top1: float) -> dict[str, Any]:
    row = Row(sweep["method"], sweep["method"])
    cells = [_cell(ctx, b, row, sweep["bits"], fp_top1, {"iters": n}) for n in sweep["iters"]]
    return {**sweep, "fp": fp_top1, "cells": cells}


def _cell(
    ctx: Context, b, row: Row, bits: str, fp_top1: float, settings: dict[str, Any]
) -> dict[str, Any]:
    t = time.perf_counter()
    art = qcli_artifact(ctx, b, row.method, bits, settings)
    cell: dict[str, Any] = {
        "row": row.label,
        "method": row.method,
        "settings": settings,
        "bits": bits,
        "calibrate_s": art.info.get("calibrate_s"),
        "calibrate_wall_s": art.info.get("calibrate_wall_s"),
        "calibrate_loadavg": art.info.get("calibrate_loadavg"),
        "cached": art.info.get("cached"),
        "export_check": art.info.get("export", {}).get("check"),
        "export_error": art.info.get("export_error"),
        "calibrate_peak_rss_mb": art.info.get("calibrate_peak_rss_mb"),
    }
    cell.update(_recon_stats(art.info.get("calibrate_result", {})))
    sim = score_sim(ctx, b, art.qmodel)
    cell["sim"] = sim.to_dict()
    if art.onnx is not None:
        ort_s = score_ort(ctx, b, art.onnx)
        cell["ort"] = ort_s.to_dict()
        cell["ort_drop"] = ort_s.top1 - fp_top1
        cell["sim_vs_ort_differ_pct"] = differ_pct(sim, ort_s)
    cell["seconds"] = round(time.perf_counter() - t, 1)
    ort_text = f"{cell['ort']['top1']:.2f}" if "ort" in cell else "export failed"
    log(
        f"ptq {b.key} {row.label} {bits}: ORT {ort_text}, sim {sim.top1:.2f}, "
        f"sim≠ORT {fmt(cell.get('sim_vs_ort_differ_pct'), 3)}%, calib {cell['calibrate_s']} s"
    )
    return cell


def _recon_stats(result: dict[str, Any]) -> dict[str, Any]:
    """Reconstruction cost and shape: the largest activation cache a unit held, the process's
    peak memory (cumulative over the cells run in one process), MRECG's merges, and the
    per-unit loss profile with its oscillation (`qcli.methods.mrecg.oscillation`)."""
    recon = result.get("reconstruction")
    if not recon:
        return {}
    out: dict[str, Any] = {
        "cache_mb": round(max(u["cache_mb"] for u in recon["units"]), 1),
        "peak_rss_mb": recon.get("peak_rss_mb"),
        "oscillation": recon.get("oscillation"),
    }
    if "mrecg" in recon:
        out["mrecg"] = recon["mrecg"]
    return out


def _oscillation_plots(key: str, cells: list[dict[str, Any]]) -> None:
    """benchmarks/ptq-oscillation-<model>-<bits>-<row>.png for each MRECG cell beside its base."""
    by = {(c["row"], c["bits"]): c for c in cells if c.get("oscillation")}
    for mrecg_row, base_row in MRECG_PAIRS.items():
        for (row, bits), c in by.items():
            base = by.get((base_row, bits))
            if row != mrecg_row or base is None:
                continue
            labels = [f"{r} ({_top1_text(x)})" for r, x in ((base_row, base), (mrecg_row, c))]
            report = pair_report(base["oscillation"], c["oscillation"], *labels)
            name = mrecg_row.split(" ")[0].replace("+", "-").lower()
            path = PLOTS / f"ptq-oscillation-{key}-{bits}-{name}.png"
            write_loss_plot(path, report, f"{key} {bits.upper()}")


def _top1_text(cell: dict[str, Any]) -> str:
    """The cell's accuracy for a plot legend: onnxruntime's top-1, else the simulation's."""
    if "ort" in cell:
        return f"ORT top-1 {cell['ort']['top1']:.2f}%"
    return f"sim top-1 {cell['sim']['top1']:.2f}%"


def pair_report(
    base: dict[str, Any], merged: dict[str, Any], base_label: str, merged_label: str
) -> dict[str, Any]:
    """One oscillation report from two runs' (manifest `oscillation` entries): the base
    method's reconstructed profile, MRECG's, and the base pass that ranked MRECG's gaps."""
    profiles = {base_label: base["profiles"]["reconstructed"]}
    for k, p in merged["profiles"].items():
        if k != "before reconstruction":
            profiles[merged_label if k == "reconstructed" else k] = p
    return {**merged, "profiles": profiles}


def markdown(payload: dict[str, Any]) -> str:
    """The tables, from the suite's JSON payload (so `run.py --render` can redo them)."""
    models = payload["models"]
    out = ["# ptq: post-training quantization, top-1 in onnxruntime", ""]
    out += header_lines(payload)
    out.append("")
    out.append(
        "Cells: top-1 (%) of the exported QDQ ONNX model run in onnxruntime, and in brackets "
        "the drop in points against the float model's own top-1 on the same images in the "
        "same run. Weights per-channel symmetric, activations per-tensor, every conv/linear "
        "quantized (first and last included). Details below: the PyTorch simulation's top-1, "
        "the share of images whose top-1 differs between simulation and onnxruntime, and the "
        "calibration wall time (the whole `calibrate` stage: method, BN tuning, saving) "
        "with the 1-minute load average when it ran. The target for sim≠ORT is at most "
        "0.1%. 'export failed': "
        "qcli's export refused the model because onnxruntime and the simulation disagreed "
        "on its 32 check images (the simulation's top-1 is still given). Reconstruction rows "
        f"run with {RECON_SETTINGS['r20']} per unit on r20 and {RECON_SETTINGS['effl0']} on "
        "effl0 (batch 32 unless given; the papers use 10k-20k iterations on a GPU); '—': not "
        "run, to ration the 2-core CPU."
    )
    for key, m in models.items():
        fp = m["fp"]["top1"]
        out += ["", f"## {key} (`{m['model']}`)", ""]
        out.append(f"Calibration: {m['calibration']}. Evaluation: {m['evaluation']}.")
        out.append("")
        header = ["method", *[b.upper() for b in m["bits"]]]
        rows = [["FP32 (PyTorch)", *[f"{fp:.2f}" for _ in m["bits"]]]]
        by_row: dict[str, dict[str, Any]] = {}
        for c in m["cells"]:
            by_row.setdefault(c["row"], {})[c["bits"]] = c
        for label, cells in by_row.items():
            line = [label]
            for bits in m["bits"]:
                c = cells.get(bits)
                if c is None:
                    line.append("—")
                elif "ort" in c:
                    line.append(f"{c['ort']['top1']:.2f} ({drop(c['ort']['top1'], fp)})")
                else:
                    line.append("export failed")
            rows.append(line)
        out.append(md_table(header, rows))
        out += ["", "Details:", ""]
        detail = []
        for c in m["cells"]:
            ort_top1 = c["ort"]["top1"] if "ort" in c else None
            la = c.get("calibrate_loadavg") or [[None]]
            detail.append(
                [
                    c["row"],
                    c["bits"].upper(),
                    ort_top1,
                    drop(ort_top1, fp),
                    c["sim"]["top1"],
                    drop(c["sim"]["top1"], fp),
                    _differ(c),
                    c.get("calibrate_wall_s") or c["calibrate_s"],
                    fmt(la[0][0], 1),
                    c.get("cache_mb", "—"),
                    c.get("calibrate_peak_rss_mb") or "—",
                    _osc(c),
                    _merged(c),
                    c["export_error"] or "",
                ]
            )
        out.append(
            md_table(
                [
                    "method",
                    "bits",
                    "ORT top-1",
                    "drop",
                    "sim top-1",
                    "sim drop",
                    "sim≠ORT",
                    "calibration s",
                    "load avg",
                    "cache MB",
                    "peak RSS MB",
                    "oscillation",
                    "MRECG merged",
                    "note",
                ],
                detail,
            )
        )
    out += _sweep_markdown(payload.get("sweeps", {}))
    out += _gap_markdown(payload.get("gaps", {}))
    if payload.get("notes"):  # written by hand into the JSON after the run, kept on --render
        out += ["", "## Reading this run", "", *payload["notes"]]
    return "\n".join(out)


def _gap_markdown(gaps: dict[str, Any]) -> list[str]:
    out = []
    for key, g in gaps.items():
        out += [
            "",
            f"## Calibration vs held-out top-1 on {key}, {g['images']} calibration images",
            "",
            f"FP32: {g['fp_calib']:.2f} on the calibration images, {g['fp_held_out']:.2f} on "
            f"{g['evaluation']}. ORT top-1; gap = calibration − held-out; equal "
            "reconstruction iterations per row; MetaAug's own time is part of calibration s.",
            "",
        ]
        rows = []
        for c in g["cells"]:
            info = c["info"]
            meta = info.get("calibrate_result", {}).get("metaaug") or {}
            rows.append(
                [
                    c["row"],
                    c["bits"].upper(),
                    c.get("calib", {}).get("top1"),
                    c.get("held_out", {}).get("top1"),
                    fmt(c.get("gap")),
                    info.get("calibrate_wall_s"),
                    meta.get("seconds", "—"),
                    meta.get("peak_rss_mb", "—"),
                ]
            )
        header = ["method", "bits", "calib top-1", "held-out top-1", "gap", "calibration s"]
        out.append(md_table([*header, "meta s", "peak RSS MB"], rows))
    return out


def _sweep_markdown(sweeps: dict[str, Any]) -> list[str]:
    out = []
    for key, sw in sweeps.items():
        out += [
            "",
            f"## Iterations vs accuracy: {sw['method']} on {key} {sw['bits'].upper()}",
            "",
            f"FP32 {sw['fp']:.2f}. Iterations are per unit; time is the calibration's own "
            "wall seconds on this CPU (1-minute load average beside it).",
            "",
        ]
        rows = []
        for c in sw["cells"]:
            t1 = c["ort"]["top1"] if "ort" in c else None
            la = c.get("calibrate_loadavg") or [[None]]
            rows.append(
                [
                    c["settings"]["iters"],
                    t1,
                    drop(t1, sw["fp"]),
                    c.get("calibrate_wall_s") or c["calibrate_s"],
                    fmt(la[0][0], 1),
                ]
            )
        out.append(md_table(["iterations", "ORT top-1", "drop", "calibration s", "load"], rows))
    return out


def _osc(c: dict[str, Any]) -> str:
    """Relative oscillation of the reconstructed per-unit loss (0: never falls with depth)."""
    report = c.get("oscillation")
    if not report:
        return "—"
    osc = report["profiles"]["reconstructed"]["oscillation"]
    return f"{osc['relative']:.3f} ({osc['decreases']})"


def _merged(c: dict[str, Any]) -> str:
    d = c.get("mrecg")
    return "; ".join("+".join(g["units"]) for g in d["merged"]) if d else ""


def _differ(c: dict[str, Any]) -> str:
    pct = c.get("sim_vs_ort_differ_pct")
    if pct is None:
        return "—"
    n = c["ort"]["n"]
    return f"{pct:.2f}% ({round(pct * n / 100)}/{n})"
