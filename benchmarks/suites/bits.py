"""bits: integer-program mixed precision against uniform bits and greedy, at equal budgets.

Per model: the sensitivities are measured once (`allocate-bits`, cached), then for every
budget (the weight size of uniform 3, 4 and 6 bits; the bit-operations of uniform W4A8; a
summed top-1-change budget) three plans are calibrated with the same method and exported:
uniform, greedy and the integer program. Cells: onnxruntime top-1, the packed weight size
(checked equal to the integers in the exported file), bit-operations, solver status and time.
Also a per-layer picture of the IP's widths (PNG, written atomically).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qcli.methods.bit_allocation import Unit, bops_total, drop_total, uniform, weight_bytes
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from qcli.stages.allocate import (
    AllocateConfig,
    BudgetRequest,
    allocate_bits,
    parse_budget,
    read_bits,
    unit_from,
)
from qcli.stages.calibrate import CalibrateConfig, calibrate
from qcli.stages.export import ExportConfig, export
from qcli.ui import SilentUI
from suites.common import (
    BENCH,
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
    score_fp,
    score_ort,
    write_partial,
)

METHOD = "mse"  # the same cheap calibration for every row (range setting, seconds per plan)
SETUP = {
    # weight candidates, activation candidates, sensitivity images
    "r20": ((2, 3, 4, 8), (4, 8), 256),
    "effl0": ((2, 3, 4, 8), (8,), 100),  # all 100 calibration images
}
BUDGETS = [
    ("size", "3bit", 3),
    ("size", "4bit", 4),
    ("size", "6bit", 6),
    ("bops", "w4a8", 4),
]
DROP_BUDGET = {"r20": "2", "effl0": "5"}  # summed top-1 confidence lost, percent


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"models": {}, "method": METHOD}
    keys = ["r20"] if ctx.quick else ["r20", "effl0"]
    for b in benches(ctx, keys):
        out["models"][b.key] = _model(ctx, b, lambda rows, k=b.key: _partial(ctx, out, k, rows))
        write_partial(ctx, out)
    return out


def _partial(ctx: Context, out: dict[str, Any], key: str, rows: list[dict]) -> None:
    """Rows so far, so a run cut short still leaves its numbers."""
    write_partial(ctx, {**out, "models": {**out["models"], key: {"rows_so_far": rows}}})


def _model(ctx: Context, b: Bench, progress=lambda rows: None) -> dict[str, Any]:
    wbits, abits, n_images = SETUP[b.key]
    fp = score_fp(ctx, b)
    log(f"{b.key}: float top-1 {fp.top1:.2f}")
    sens = _sensitivities(ctx, b, wbits, abits, n_images)
    doc = read_bits(sens)
    units = [unit_from(d) for d in doc["sensitivities"]["units"]]
    rows = []
    budgets = [*BUDGETS, ("drop", DROP_BUDGET[b.key], None)]
    for kind, text, uni_w in budgets:
        request = parse_budget(kind, text)
        budget = request.resolve(units)
        for solver in ("uniform", "greedy", "ip"):
            row = {"budget": request.describe(), "kind": kind, "limit": budget.value}
            if solver == "uniform":
                w = uni_w if uni_w is not None else _uniform_for_drop(units, budget.value)
                plan = QuantPlan.uniform(BitConfig(w, 8))
                bits = uniform(units, w, 8)
                row |= {"solver": f"uniform w{w}a8", "status": "—", "solve_s": None}
            else:
                alloc_doc = _allocate(ctx, b, sens, request, solver, wbits, abits)
                plan = QuantPlan.from_dict(alloc_doc["plan"])
                bits = {**dict(plan.weights), **dict(plan.activations)}
                a = alloc_doc["allocation"]
                row |= {
                    "solver": solver,
                    "engine": a["solver"],
                    "status": a["status"],
                    "solve_s": a["seconds"],
                    "objective": a["objective"],
                    "predicted_kl": a["predicted_degradation"],
                    "predicted_drop_pct": a["predicted_drop_pct"],
                }
            row["size_bytes"] = weight_bytes(units, bits)
            row["bops"] = bops_total(units, bits)
            row["weight_bits"] = {u.name: bits[u.name] for u in units if u.kind == "weight"}
            if kind == "size":
                row["met"] = row["size_bytes"] <= budget.value + 1e-9
            elif kind == "bops":
                row["met"] = row["bops"] <= budget.value + 1e-9
            else:
                row["met"] = None
            row |= _evaluate(ctx, b, plan)
            row["file_weight_bytes_ok"] = (
                row.get("file_weight_bytes") is not None
                and abs(row["file_weight_bytes"] - row["size_bytes"]) < 1e-6
            )
            log(
                f"{b.key} {row['budget']} {row['solver']}: top-1 {row.get('top1')} "
                f"size {row['size_bytes']:.0f} B"
            )
            rows.append(row)
            progress(rows)
    picture = _picture(b, units, rows)
    return {
        "model": b.model.spec,
        "calibration": b.calib_desc,
        "evaluation": b.eval_desc,
        "fp_top1": fp.top1,
        "sensitivity": doc["sensitivities"]["info"],
        "candidates": {"weight": list(wbits), "act": list(abits)},
        "fp32_weight_bytes": weight_bytes(units, uniform(units, 32, 32)),
        "rows": rows,
        "picture": picture,
    }


def _uniform_for_drop(units: list[Unit], limit: float) -> int:
    """The narrowest uniform weight width whose predicted added top-1 changes fit."""
    for w in (2, 3, 4, 8):
        if drop_total(units, uniform(units, w, 8)) <= limit:
            return w
    return 8


def _sensitivities(ctx: Context, b: Bench, wbits, abits, n_images) -> Path:
    key = cache_key(model=b.key, calib=str(b.calib), w=wbits, a=abits, n=n_images)
    d = ctx.key_dir(b.key, f"sens-{key}")
    path = d / "bits.json"
    if ctx.use_cache and path.is_file():
        return path
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t = time.perf_counter()
    la0 = loadavg()
    allocate_bits(
        AllocateConfig(
            b.model,
            b.calib,
            path,
            BudgetRequest("size", weight_bits=4),
            wbits,
            abits,
            images=n_images,
            verify=False,
            force=True,
        ),
        SilentUI(),
    )
    log(f"{b.key}: sensitivities in {time.perf_counter() - t:.0f} s (load {la0} -> {loadavg()})")
    return path


def _allocate(ctx, b, sens: Path, request: BudgetRequest, solver: str, wbits, abits) -> dict:
    """Solve from the cached sensitivities (the solver's own time is what the row reports)."""
    d = sens.parent / f"alloc-{solver}-{cache_key(r=dataclasses.asdict(request))}"
    d.mkdir(exist_ok=True)
    path = d / "bits.json"
    allocate_bits(
        AllocateConfig(
            b.model,
            None,
            path,
            request,
            wbits,
            abits,
            solver,
            sensitivities=sens,
            verify=False,
            force=True,
        ),
        SilentUI(),
    )
    return json.loads(path.read_text())


def _evaluate(ctx: Context, b: Bench, plan: QuantPlan) -> dict[str, Any]:
    key = cache_key(model=b.key, calib=str(b.calib), plan=plan.to_json(), method=METHOD)
    d = ctx.key_dir(b.key, f"bits-{key}")
    info_file = d / "info.json"
    if ctx.use_cache and info_file.is_file():
        return json.loads(info_file.read_text())
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    q, o = d / "model.qcli", d / "model.onnx"
    t = time.perf_counter()
    calibrate(
        CalibrateConfig(b.model, b.calib, q, method=METHOD, plan=plan, force=True), SilentUI()
    )
    info: dict[str, Any] = {"calibrate_s": round(time.perf_counter() - t, 1)}
    try:
        ex = export(ExportConfig(q, o, force=True), SilentUI())
        info["sim_vs_ort_check_pct"] = ex["check"]["disagreement_pct"]
        info["onnx_bytes"] = ex["bytes"]
        info["file_weight_bytes"] = file_weight_bytes(o)
        s = score_ort(ctx, b, o)
        info["top1"] = s.top1
        info["eval_s"] = s.seconds
    except Exception as e:  # a failed export is a result to report
        info["error"] = f"{type(e).__name__}: {e}"
    info_file.write_text(json.dumps(info, indent=2))
    return info


def file_weight_bytes(path: Path) -> float:
    """Packed weight bytes of an exported file: each integer weight tensor at the width its
    quantizer declares (metadata), after checking its integers fit that width."""
    model = onnx.load(str(path))
    widths = json.loads({p.key: p.value for p in model.metadata_props}["qcli_quantizers"])
    by_node = {k.replace(".", "_").removesuffix("_weight_quantizer"): v for k, v in widths.items()}
    inits = {t.name: t for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.name.endswith("_weight_dq"):
            bits = by_node[node.name.removesuffix("_weight_dq")]
            ints = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64)
            c = ints - zp.reshape(-1, *([1] * (ints.ndim - 1)))
            if c.min() < -(2 ** (bits - 1)) or c.max() > 2 ** (bits - 1) - 1:
                raise ValueError(f"{node.name}: integers exceed {bits} bits")
            total += ints.size * bits / 8
    return total


# -- the picture ----------------------------------------------------------------------------


def _picture(b: Bench, units: list[Unit], rows: list[dict]) -> str | None:
    """Bars of the IP's weight widths per layer (execution order) at the 3, 4 and 6-bit sizes."""
    from PIL import Image, ImageDraw

    chosen = [r for r in rows if r["solver"] == "ip" and r["kind"] == "size"]
    layers = [u.name for u in units if u.kind == "weight"]
    if not chosen or not layers:
        return None
    bar, gap, panel_h, left = 10, 2, 120, 150
    width = left + len(layers) * (bar + gap) + 20
    height = 30 + len(chosen) * (panel_h + 30) + 20
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    colors = {2: (215, 48, 39), 3: (252, 141, 89), 4: (145, 191, 219), 8: (69, 117, 180)}
    draw.text((10, 8), f"{b.key}: IP weight bits per layer (execution order)", fill="black")
    for i, r in enumerate(chosen):
        top = 30 + i * (panel_h + 30)
        draw.text((10, top + panel_h // 2), r["budget"][:22], fill="black")
        base = top + panel_h
        draw.line((left, base, width - 10, base), fill="black")
        for j, name in enumerate(layers):
            bits = r["weight_bits"][name]
            x0 = left + j * (bar + gap)
            h = int(panel_h * bits / 8)
            draw.rectangle((x0, base - h, x0 + bar, base), fill=colors.get(bits, (120, 120, 120)))
    legend = "  ".join(f"{k} bits" for k in sorted(colors))
    draw.text((left, height - 16), f"bar height = bits; colours: {legend}", fill="black")
    path = BENCH / "results" / f"bits-{b.key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: a reader sees the old picture or the new one
    return str(path.relative_to(BENCH.parent))


# -- the table ------------------------------------------------------------------------------


def markdown(payload: dict[str, Any]) -> str:
    out = ["# bits: mixed precision (integer program) against uniform bits and greedy", ""]
    out += [*header_lines(payload), ""]
    out.append(
        f"Every row calibrated with `{payload['method']}` range setting (the same for uniform, "
        "greedy and IP: the comparison is of the allocation, not the calibration) and run in "
        "onnxruntime. Sizes are packed weight bytes, Σ params·bits/8, checked equal to the "
        "integers the exported ONNX file holds at the width its metadata declares (column "
        "'file'); activations stay at 8 bits unless a model's candidates include 4. "
        "Bit-operations per image: Σ MACs·w·a. The drop budget limits the summed top-1 "
        "confidence (percent, on the sensitivity images) that each quantizer's width loses "
        "beyond its widest candidate, measured one quantizer at a time (the IP then minimizes "
        "size); its "
        "uniform row is the narrowest uniform width whose prediction fits."
    )
    for key, m in payload["models"].items():
        sens = m["sensitivity"]
        out += ["", f"## {key} (`{m['model']}`)", ""]
        out.append(
            f"Float top-1 {m['fp_top1']:.2f} on {m['evaluation']}. Calibration: "
            f"{m['calibration']}. Sensitivities: {sens.get('images')} calibration images, "
            f"{sens.get('seconds')} s; candidates weights {m['candidates']['weight']}, "
            f"activations {m['candidates']['act']}. FP32 weights: "
            f"{m['fp32_weight_bytes']:,.0f} bytes."
        )
        if m.get("picture"):
            out.append(f"Per-layer widths of the IP: `{m['picture']}`.")
        out.append("")
        rows = []
        for r in m["rows"]:
            rows.append(
                [
                    r["budget"],
                    f"{r['limit']:,.0f}" if r["kind"] != "drop" else f"{r['limit']:g}%",
                    r["solver"],
                    fmt(r.get("top1")),
                    drop(r.get("top1"), m["fp_top1"]),
                    f"{r['size_bytes']:,.0f}",
                    "✓" if r.get("file_weight_bytes_ok") else "✗",
                    f"{r['bops'] / 1e9:.3f}",
                    {True: "yes", False: "no", None: "—"}[r["met"]],
                    r.get("status", "—"),
                    "—" if r.get("solve_s") is None else f"{r['solve_s']:.3f}",
                ]
            )
        header = [
            "budget",
            "limit",
            "allocation",
            "ORT top-1",
            "drop",
            "weight bytes",
            "file",
            "G bit-ops",
            "met",
            "status",
            "solve s",
        ]
        out.append(md_table(header, rows))
        errors = [f"{r['budget']} {r['solver']}: {r['error']}" for r in m["rows"] if r.get("error")]
        if errors:
            out += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(out)
