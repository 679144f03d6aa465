"""deploy: what runs in onnxruntime. FP32; qcli W8A8 with the saturation-safe int8 range (the
default) and the full range; qcli W4A8 stored as int8 (the default) and packed int4; and
onnxruntime's own quantize_static (MinMax, Percentile, Entropy) on the same FP32 ONNX and the
same calibration images: top-1, the share of images whose top-1 differs between the PyTorch
simulation and onnxruntime, the kernel check (top-1 changes between onnxruntime's integer
kernels and its reference arithmetic on this CPU), the static check (layers whose int16 pair
sums could saturate on x86 without VNNI), latency at batch 1 and 64, file size.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcli.evaluate import OrtModel, file_size, latency
from qcli.export import kernels
from qcli.stages.export import ExportConfig, export
from qcli.ui import SilentUI
from suites.common import (
    THREADS,
    Bench,
    Context,
    Scored,
    benches,
    cache_key,
    differ_pct,
    drop,
    export_fp32_onnx,
    fmt,
    header_lines,
    loadavg,
    log,
    md_table,
    qcli_artifact,
    score_fp,
    score_ort,
    score_sim,
)

ORT_METHODS = [("MinMax", "minmax"), ("Percentile", "percentile"), ("Entropy", "entropy")]
# (label, method, bits, calibration settings, weight storage). W4A8 gets BN tuning: MSE alone
# loses most of EfficientNet-Lite0 at 4 bits, which would make its accuracy column noise.
QCLI_TARGETS = [
    ("qcli W8A8 MSE, int8 range safe (default)", "mse", "w8a8", {}, "int8"),
    ("qcli W8A8 MSE, int8 range full", "mse", "w8a8", {"int8_range": "full"}, "int8"),
    ("qcli W4A8 MSE+BN tune, int8 storage (default)", "mse", "w4a8", {"bn_tune": True}, "int8"),
    ("qcli W4A8 MSE+BN tune, int4 storage", "mse", "w4a8", {"bn_tune": True}, "int4"),
]
ORT_TIMEOUT_S = 300
# The kernel check again on an emulated AVX2-only CPU (qemu user mode, Haswell: MLAS picks its
# AVX2 kernels, whose integer arithmetic the emulator computes exactly; its timings mean
# nothing). Runs where qemu-x86_64 is installed, on the W8A8 files and onnxruntime's MinMax.
EMULATED_AVX2 = ["qemu-x86_64", "-cpu", "Haswell"]
EMULATED_IMAGES = {"r20": 500, "effl0": 50}
EMULATED_TIMEOUT_S = 1800
WORKER = Path(__file__).with_name("ort_quantize_worker.py")


@dataclass
class LatencyPlan:
    rounds: int
    b1_repeats: int
    b1_budget_s: float
    b64_repeats: int
    b64_budget_s: float


FULL_LATENCY = LatencyPlan(
    rounds=3, b1_repeats=50, b1_budget_s=2.0, b64_repeats=10, b64_budget_s=4.0
)
QUICK_LATENCY = LatencyPlan(
    rounds=2, b1_repeats=20, b1_budget_s=1.0, b64_repeats=5, b64_budget_s=1.5
)


@dataclass
class Target:
    label: str
    kind: str  # fp32 | qcli | ort
    onnx: Path | None
    info: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def run(ctx: Context) -> dict[str, Any]:
    keys = ["r20"] if ctx.quick else ["r20", "effl0"]
    plan = QUICK_LATENCY if ctx.quick else FULL_LATENCY
    models = {}
    for b in benches(ctx, keys):
        models[b.key] = _model(ctx, b, plan)
    payload = {"latency_plan": plan.__dict__, "ort_timeout_s": ORT_TIMEOUT_S, "models": models}
    return payload


def _model(ctx: Context, b: Bench, plan: LatencyPlan) -> dict[str, Any]:
    log(f"deploy {b.key}: FP32 ONNX export")
    fp32, how = export_fp32_onnx(ctx, b)
    targets = [Target("FP32", "fp32", fp32, {"made_from": how})]
    for label, method, bits, settings, storage in QCLI_TARGETS:
        log(f"deploy {b.key}: {label}")
        art = qcli_artifact(ctx, b, method, bits, settings)
        onnx_path = art.onnx if storage == "int8" else _export_storage(art.qmodel, storage)
        t = Target(label, "qcli", onnx_path, dict(art.info))
        t.info["qmodel"] = art.qmodel
        t.info["weight_storage"] = storage
        targets.append(t)
    calib_npy = _calibration_npy(ctx, b)
    for label, method in ORT_METHODS:
        log(f"deploy {b.key}: onnxruntime quantize_static {label}")
        targets.append(_ort_target(ctx, b, fp32, calib_npy, label, method))

    log(f"deploy {b.key}: accuracy")
    fp_torch = score_fp(ctx, b)
    ref_fp32: Scored | None = None
    for t in targets:
        if t.onnx is None:
            continue
        s = score_ort(ctx, b, t.onnx)
        t.result["ort"] = s.to_dict()
        ref = score_ort(ctx, b, t.onnx, optimize=False)
        t.result["kernel_check_differ"] = int((ref.predictions != s.predictions).sum())
        t.result["kernel_check_pct"] = differ_pct(ref, s)
        t.result["saturating_layers"] = len(kernels.pair_sum_violations(t.onnx))
        t.result["ort_drop"] = s.top1 - fp_torch.top1
        t.result["bytes"] = file_size(t.onnx)
        sim = fp_torch if t.kind == "fp32" else None
        if t.kind == "qcli":
            sim = score_sim(ctx, b, t.info["qmodel"])
        if sim is not None:
            t.result["sim"] = sim.to_dict()
            t.result["sim_vs_ort_differ"] = int((sim.predictions != s.predictions).sum())
            t.result["sim_vs_ort_differ_pct"] = differ_pct(sim, s)
        if t.kind == "fp32":
            ref_fp32 = s
        elif ref_fp32 is not None:
            t.result["vs_fp32_ort_differ_pct"] = differ_pct(ref_fp32, s)
        log(
            f"deploy {b.key} {t.label}: ORT top-1 {s.top1:.2f}, sim≠ORT "
            f"{fmt(t.result.get('sim_vs_ort_differ_pct'), 3)}%"
        )

    log(f"deploy {b.key}: latency ({plan.rounds} rounds, targets interleaved)")
    _latency(b, [t for t in targets if t.onnx is not None], plan)
    if not ctx.quick and shutil.which(EMULATED_AVX2[0]):
        for t in targets:
            if t.onnx is not None and ("W8A8" in t.label or t.label.endswith("MinMax")):
                log(f"deploy {b.key} {t.label}: kernel check on an emulated AVX2 CPU")
                t.result["emulated_avx2"] = _emulated_avx2_check(b, t.onnx)
    return {
        "model": b.model.spec,
        "calibration": b.calib_desc,
        "evaluation": b.eval_desc,
        "fp_torch": fp_torch.to_dict(),
        "fp32_onnx_from": how,
        "targets": [
            {"label": t.label, "kind": t.kind, "onnx": t.onnx, "info": t.info, **t.result}
            for t in targets
        ],
    }


def _emulated_avx2_check(b: Bench, onnx_path: Path) -> dict[str, Any]:
    """`qcli eval`'s kernel check run under qemu's Haswell CPU (AVX2, no VNNI)."""
    n = EMULATED_IMAGES[b.key]
    cmd = [*EMULATED_AVX2, sys.executable, "-m", "qcli", "eval", str(onnx_path)]
    cmd += ["--data", str(b.eval_path), "--limit", str(n), "--no-latency", "--json"]
    env = {**os.environ, "QCLI_CPU_CLASS": "avx2", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=EMULATED_TIMEOUT_S, env=env
        )
        report = json.loads(proc.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}", "images": n}
    return {
        **report["kernel_check"],
        "saturating_layers": report["saturating_layers"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd[:3]) + " python -m qcli eval ...",
    }


def _export_storage(qmodel: Path, storage: str) -> Path | None:
    """The same .qcli written with another weight storage, beside the default export."""
    out = qmodel.parent / f"model-{storage}.onnx"
    if not out.is_file():
        cfg = ExportConfig(qmodel=qmodel, out=out, force=True, weight_storage=storage)
        export(cfg, SilentUI())
    return out


def _calibration_npy(ctx: Context, b: Bench) -> Path:
    d = ctx.key_dir(b.key, "calib-" + cache_key(calib=str(b.calib)))
    path = d / "images.npy"
    if not (ctx.use_cache and path.is_file()):
        d.mkdir(parents=True, exist_ok=True)
        np.save(path, np.concatenate(b.calib_arrays(b.calib.batch_size)))
    return path


def _ort_target(
    ctx: Context, b: Bench, fp32: Path, calib_npy: Path, label: str, method: str
) -> Target:
    import onnxruntime

    label = f"onnxruntime quantize_static {label}"
    d = ctx.key_dir(
        b.key,
        f"ortq-{method}-"
        + cache_key(calib=str(b.calib), ort=onnxruntime.__version__, fp32=fp32.parent.name),
    )
    info_file = d / "info.json"
    out = d / "model.onnx"
    if ctx.use_cache and info_file.is_file() and out.is_file():  # failures are retried
        info = json.loads(info_file.read_text())
        info["cached"] = True
        return Target(label, "ort", out, info)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    report = d / "report.json"
    cmd = [sys.executable, str(WORKER), str(fp32), str(out), str(calib_npy), method]
    cmd += [str(b.calib.batch_size), str(report)]
    info: dict[str, Any] = {"method": method, "calibrate_loadavg": [loadavg()]}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=ORT_TIMEOUT_S,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            info["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
    except subprocess.TimeoutExpired:
        info["error"] = f"did not finish within {ORT_TIMEOUT_S} s (stopped)"
    info["wall_s"] = round(time.perf_counter() - t0, 2)
    info["calibrate_loadavg"].append(loadavg())
    if report.is_file():
        info.update(json.loads(report.read_text()))
        info["calibrate_s"] = info["seconds"]
    if "error" in info:
        log(f"deploy {b.key} {label}: {info['error']}")
        out.unlink(missing_ok=True)
    info_file.write_text(json.dumps(info, indent=2))
    info["cached"] = False
    return Target(label, "ort", out if out.is_file() else None, info)


def _latency(b: Bench, targets: list[Target], plan: LatencyPlan) -> None:
    """Median over rounds of each round's median; targets interleaved round by round so that
    load changes on the shared machine hit every target alike."""
    sessions = {t.label: OrtModel(t.onnx, threads=THREADS) for t in targets}
    per: dict[str, dict[int, list[float]]] = {t.label: {1: [], 64: []} for t in targets}
    loads: dict[str, list[list[float]]] = {t.label: [] for t in targets}
    for r in range(plan.rounds):
        for t in targets:
            fn = sessions[t.label]
            s1 = latency(fn, b.input_shape, (1,), plan.b1_repeats, 5, plan.b1_budget_s, seed=r)
            s64 = latency(fn, b.input_shape, (64,), plan.b64_repeats, 1, plan.b64_budget_s, seed=r)
            per[t.label][1].append(s1[1].median * 1000)
            per[t.label][64].append(s64[64].median * 1000)
            loads[t.label].append(loadavg())
    for t in targets:
        t.result["latency_ms"] = {
            str(n): round(statistics.median(v), 3) for n, v in per[t.label].items()
        }
        t.result["latency_rounds_ms"] = {str(n): v for n, v in per[t.label].items()}
        t.result["latency_loadavg"] = loads[t.label]
    base = targets[0].result["latency_ms"]
    for t in targets:
        t.result["latency_vs_fp32"] = {
            n: round(t.result["latency_ms"][n] / base[n], 3) for n in base
        }
        log(
            f"deploy {b.key} {t.label}: b1 {t.result['latency_ms']['1']:.2f} ms, "
            f"b64 {t.result['latency_ms']['64']:.1f} ms "
            f"({t.result['latency_vs_fp32']['64']:.2f}x FP32)"
        )


def markdown(payload: dict[str, Any]) -> str:
    """The tables, from the suite's JSON payload (so `run.py --render` can redo them)."""
    models = payload["models"]
    plan = LatencyPlan(**payload["latency_plan"])
    out = ["# deploy: onnxruntime accuracy, agreement with the simulation, latency, size", ""]
    out += [*header_lines(payload), ""]
    out.append(
        "ORT top-1: the ONNX file run in onnxruntime (CPU, graph optimizations on); drop in "
        "points against the float PyTorch model on the same images. sim≠ORT: share of "
        "evaluation images whose top-1 class differs between the PyTorch simulation (for "
        "FP32: the float PyTorch model) and onnxruntime; target at most 0.1%. Kernel check: "
        "share of images whose top-1 differs between onnxruntime's integer kernels and its "
        "reference arithmetic (graph optimizations off) on this CPU. Saturating layers: "
        "u8×s8 layers of the file whose int16 pair sums could saturate on x86 CPUs without "
        "VNNI (a static property of the file: 0 means exact on every CPU). Latency: "
        f"onnxruntime with {THREADS} intra-op threads, random input, median over "
        f"{plan.rounds} interleaved rounds of per-round medians (batch 1: up to "
        f"{plan.b1_repeats} calls or {plan.b1_budget_s} s after 5 warm-up calls; batch 64: "
        f"up to {plan.b64_repeats} calls or {plan.b64_budget_s} s, at least 3, after 1 "
        "warm-up), in brackets the ratio to FP32 measured in the same run. onnxruntime's "
        "quantize_static: QDQ, uint8 activations, per-channel int8 weights, after "
        "quant_pre_process, on the same FP32 ONNX and calibration images as qcli; "
        "calibration time is its whole quantize_static call."
    )
    for key, m in models.items():
        fp = m["fp_torch"]["top1"]
        out += ["", f"## {key} (`{m['model']}`)", ""]
        out.append(
            f"Calibration: {m['calibration']}. Evaluation: {m['evaluation']}. "
            f"Float PyTorch top-1: {fp:.2f}. FP32 ONNX exported from the "
            f"{m['fp32_onnx_from']}."
        )
        out.append("")
        rows = []
        base_bytes = m["targets"][0].get("bytes")
        for t in m["targets"]:
            if "ort" not in t:
                err = t["info"].get("error") or t["info"].get("export_error") or "no model"
                rows.append([t["label"], *["—"] * 9, f"failed: {err}"])
                continue
            lat = t.get("latency_ms", {})
            ratio = t.get("latency_vs_fp32", {})
            calib_s = t["info"].get("calibrate_s")
            note = ""
            if t["kind"] == "ort" and "peak_rss_mb" in t["info"]:
                note = f"peak RSS {t['info']['peak_rss_mb']} MB"
            rows.append(
                [
                    t["label"],
                    t["ort"]["top1"],
                    drop(t["ort"]["top1"], fp),
                    t.get("sim", {}).get("top1"),
                    _differ(t),
                    f"{t['kernel_check_pct']:.2f}% ({t['kernel_check_differ']}/{t['ort']['n']})",
                    t["saturating_layers"],
                    _lat(lat.get("1"), ratio.get("1"), 3),
                    _lat(lat.get("64"), ratio.get("64"), 1),
                    _lat(t["bytes"] / 1024, t["bytes"] / base_bytes, 0),
                    (fmt(calib_s, 1) + " s" if calib_s is not None else "")
                    + (f"; {note}" if note else ""),
                ]
            )
        out.append(
            md_table(
                [
                    "model",
                    "ORT top-1",
                    "drop",
                    "sim top-1",
                    "sim≠ORT",
                    "kernel check",
                    "saturating layers",
                    "batch 1 ms (×FP32)",
                    "batch 64 ms (×FP32)",
                    "size KiB (×FP32)",
                    "calibration",
                ],
                rows,
            )
        )
        emulated = [t for t in m["targets"] if t.get("emulated_avx2")]
        if emulated:
            out += [
                "",
                "Kernel check on an emulated AVX2-only CPU (`qemu-x86_64 -cpu Haswell`: "
                "onnxruntime picks its AVX2 kernels, whose integer arithmetic the emulator "
                "computes exactly), first images of the evaluation set:",
                "",
            ]
            erows = []
            for t in emulated:
                e = t["emulated_avx2"]
                if "error" in e:
                    erows.append([t["label"], f"failed: {e['error']}"])
                    continue
                erows.append(
                    [t["label"], f"{e['changed_pct']:.2f}% ({e['changed']}/{e['images']})"]
                )
            out.append(md_table(["model", "kernel check, emulated AVX2"], erows))
        las = [la for t in m["targets"] for la in t.get("latency_loadavg", [])]
        if las:
            ones = [la[0] for la in las]
            out += ["", f"Load average (1 min) during latency: {min(ones):.1f} to {max(ones):.1f}."]
    return "\n".join(out)


def _differ(t: dict[str, Any]) -> str:
    if "sim_vs_ort_differ_pct" not in t:
        return "—"
    n = t["ort"]["n"]
    return f"{t['sim_vs_ort_differ_pct']:.2f}% ({t['sim_vs_ort_differ']}/{n})"


def _lat(v: float | None, ratio: float | None, digits: int) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f} ({ratio:.2f}×)" if ratio is not None else f"{v:.{digits}f}"
