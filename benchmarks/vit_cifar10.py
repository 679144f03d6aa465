"""A trained vision transformer, quantized by qcli and by onnxruntime's own tool, side by side.

`python benchmarks/vit_cifar10.py [--calib 512] [--iters 200]` needs the ViT trained and
cached by `benchmarks/train_vit_cifar10.py` (.bench-cache/vit_cifar10.pt). On the same 512
cifar10/train images it runs, through the CLI, `qcli calibrate` (range setting at W8A8 and
W4A8, QDrop and BRECQ reconstruction at W4A8, and W8A8 on noise images: what data-free
costs a model without BatchNorm) and `qcli export`; beside them onnxruntime's
`quantize_static` on the float ONNX of the same model (QDQ, uint8 activations, int8
per-channel weights; int4 weights at W4A8 where onnxruntime can). Every file is scored in
onnxruntime on all 10,000 cifar10/test images; latency is onnxruntime FP32 against both INT8
files at batch 1 and 64, one thread, in interleaved rounds of one run. Writes
benchmarks/results/vit_cifar10.json and benchmarks/vit_cifar10.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from suites.common import run_meta, write_outputs  # noqa: E402

SHARED = Path(os.environ.get("QCLI_SHARED_DATA", ROOT.parent / "shared" / "data"))
WEIGHTS = ROOT / ".bench-cache" / "vit_cifar10.pt"
MODEL = "builtin:vit_cifar10"


def _qcli(*args: str) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qcli", *args, "--json"], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"qcli {' '.join(args[:2])} failed: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout), seconds


def _images(
    path: Path, spec, limit: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    from qcli.data import iterate, open_data

    ds = open_data(path, spec, limit=limit, seed=seed)
    xs, ys = zip(*iterate(ds, 256), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _top1(onnx_path: Path, x: torch.Tensor, y: torch.Tensor, optimize: bool = True) -> float:
    from qcli.evaluate import OrtModel

    model = OrtModel(onnx_path, optimize=optimize)
    pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return round(100.0 * float((pred == y).float().mean()), 2)


def _latencies(paths: dict[str, Path], rounds: int = 15) -> dict[str, dict[int, float]]:
    """Median onnxruntime latency (ms) of each file at batch 1 and 64, one intra-op thread,
    measured in interleaved rounds so that load changes hit every file alike."""
    import onnxruntime as ort

    def session(path: Path) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {k: session(p) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, float]] = {k: {} for k in paths}
    for batch, calls in ((1, 50), (64, 3)):
        x = {"input": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for k, sess in sessions.items():
                sess.run(None, x)
                start = time.perf_counter()
                for _ in range(calls):
                    sess.run(None, x)
                times[k].append((time.perf_counter() - start) / calls)
        for k in paths:
            out[k][batch] = round(1000 * float(np.median(times[k])), 3)
    return out


def _fp32_onnx(module: torch.nn.Module, path: Path) -> None:
    from qcli.export.float_onnx import export_module

    export_module(module, (3, 32, 32), path)


def _ort_static(fp32: Path, out: Path, calib: np.ndarray, int4: bool) -> float:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from suites.ort_baseline import ArrayReader, input_name

    start = time.perf_counter()
    quantize_static(
        str(fp32),
        str(out),
        ArrayReader(input_name(fp32), [calib[i : i + 64] for i in range(0, len(calib), 64)]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt4 if int4 else QuantType.QInt8,
    )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=512, help="calibration images")
    parser.add_argument("--iters", type=int, default=200, help="reconstruction steps per unit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, test = SHARED / "cifar10" / "train", SHARED / "cifar10" / "test"
    if not test.is_dir():
        print(f"skipped: {test} not found")
        return 0
    if not WEIGHTS.is_file():
        print(f"no trained weights at {WEIGHTS}: run benchmarks/train_vit_cifar10.py first")
        return 1
    from qcli.models import ModelSource, load_model

    loaded = load_model(ModelSource(MODEL, weights=str(WEIGHTS)))
    x_test, y_test = _images(test, loaded.input_spec, None)
    x_cal, _ = _images(train, loaded.input_spec, args.calib, args.seed)
    rows: list[dict] = []
    model = ["--weights", str(WEIGHTS)]
    calib = ["--data", str(train), "--limit", str(args.calib), "--seed", str(args.seed)]
    timed: dict[str, tuple[int, Path]] = {}  # files to time together: row index, path
    with tempfile.TemporaryDirectory(prefix="qcli-vit-") as tmp_dir:
        tmp = Path(tmp_dir)
        fp32 = tmp / "fp32.onnx"
        _fp32_onnx(loaded.module, fp32)
        fp_top1 = _top1(fp32, x_test, y_test)
        rows.append({"row": "FP32 (onnxruntime)", "bits": "fp32", "top1": fp_top1})
        noise_dir = tmp / "noise"
        _qcli("generate-data", MODEL, *model, "--method", "noise", "--num-images",
              str(args.calib), "--out", str(noise_dir))  # fmt: skip
        cells = [
            ("qcli MSE ranges", "w8a8", ["--method", "mse"], calib),
            ("qcli MSE ranges, noise images (data-free)", "w8a8", ["--method", "mse"],
             ["--data", str(noise_dir)]),
            ("qcli MSE ranges", "w4a8", ["--method", "mse"], calib),
            ("qcli QDrop", "w4a8", ["--method", "qdrop", "--iters", str(args.iters)], calib),
            ("qcli BRECQ", "w4a8", ["--method", "brecq", "--iters", str(args.iters)], calib),
        ]  # fmt: skip
        for label, bits, method, data in cells:
            q, o = tmp / f"{len(rows)}.qcli", tmp / f"{len(rows)}.onnx"
            cal, t_cal = _qcli("calibrate", MODEL, *model, *data, "--bits", bits, *method,
                               "--out", str(q))  # fmt: skip
            exp, _ = _qcli("export", str(q), "--out", str(o))
            row = {
                "row": label,
                "bits": bits,
                "top1": _top1(o, x_test, y_test),
                "top1_reference": _top1(o, x_test, y_test, optimize=False),
                "calibrate_s": round(t_cal, 1),
                "gate_top1_differ_pct": round(exp["check"]["disagreement_pct"], 2),
                "ops": f"{cal['ops']['integer_ops']} of {cal['ops']['compute_ops']}",
            }
            if bits == "w8a8" and "noise" not in label:
                timed["qcli"] = (len(rows), Path(shutil.copy(o, tmp / "qcli-w8a8.onnx")))
            print(json.dumps(row), flush=True)
            rows.append(row)
        for bits, int4 in (("w8a8", False), ("w4a8", True)):
            out = tmp / f"ort-{bits}.onnx"
            try:
                secs = _ort_static(fp32, out, x_cal.numpy(), int4)
            except Exception as e:  # onnxruntime's int4 path may not cover this graph
                rows.append({"row": "onnxruntime quantize_static", "bits": bits,
                             "error": str(e).splitlines()[0][:200]})  # fmt: skip
                continue
            row = {
                "row": "onnxruntime quantize_static (minmax, per-channel)",
                "bits": bits,
                "top1": _top1(out, x_test, y_test),
                "calibrate_s": round(secs, 1),
            }
            if bits == "w8a8":
                timed["onnxruntime"] = (len(rows), out)
            print(json.dumps(row), flush=True)
            rows.append(row)
        timed["fp32"] = (0, fp32)
        latencies = _latencies({k: path for k, (_, path) in timed.items()})
        for k, (i, _) in timed.items():
            rows[i]["latency_ms"] = latencies[k]
    meta = {**run_meta("vit_cifar10.py"), "calib_images": args.calib, "iters": args.iters}
    write_outputs("vit_cifar10", {"meta": meta, "rows": rows}, _render(rows, meta, fp_top1))
    return 0


def _render(rows: list[dict], meta: dict, fp: float) -> str:
    out = [
        "# A trained ViT on CIFAR-10: qcli against onnxruntime's quantize_static",
        "",
        f"`{meta['command']}` — {meta['date']}, CPU flags {meta['cpu_flags']}, load "
        f"{meta['load']}, onnxruntime {meta['onnxruntime']}, qcli at {meta['commit']}. "
        f"`builtin:vit_cifar10` (patch 4, dim 128, depth 6, 4 heads) trained by "
        f"`benchmarks/train_vit_cifar10.py`; {meta['calib_images']} calibration images "
        f"from cifar10/train, top-1 in onnxruntime (integer kernels; reference arithmetic "
        f"in brackets) on all 10,000 cifar10/test images.",
        "",
        "| row | bits | top-1 | Δ vs FP | integer kernels | calibrate s | "
        "latency b1 / b64 ms (1 thread) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['row']} | {r['bits']} | failed: {r['error']} | | | | |")
            continue
        lat = r.get("latency_ms", {})
        latency = f"{lat[1]} / {lat[64]}" if lat else ""
        ref = f" ({r['top1_reference']})" if "top1_reference" in r else ""
        delta = "" if r["bits"] == "fp32" else f"{r['top1'] - fp:+.2f}"
        out.append(
            f"| {r['row']} | {r['bits']} | {r['top1']}{ref} | {delta} | {r.get('ops', '')} | "
            f"{r.get('calibrate_s', '')} | {latency} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
