"""The architecture matrix as a practitioner meets it: every family through the CLI.

`python benchmarks/arch_matrix.py [--rows REGEX] [--bits w8a8,w4a8]` runs, for each
architecture (random init: nothing can be downloaded) at the smallest input it accepts,
`qcli calibrate --method minmax` on 16 ImageNet-sample images and `qcli export` with its
simulation == onnxruntime gate, and writes benchmarks/results/arch_matrix.json and
benchmarks/arch_matrix.md: pass or the error's first line, compute ops in integer kernels,
the ops left in float, sim vs onnxruntime (top-1 share that differs, max |Δlogit| over the
logit range, both onnxruntime paths) and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from suites.common import run_meta, write_outputs  # noqa: E402

SHARED = Path(os.environ.get("QCLI_SHARED_DATA", ROOT.parent / "shared" / "data"))
ROWS = [
    ("timm:resnet18", 32),
    ("timm:resnet50", 32),
    ("timm:mobilenetv2_100", 32),
    ("timm:mobilenetv3_small_100", 32),
    ("timm:efficientnet_b0", 32),
    ("timm:regnetx_002", 32),
    ("timm:convnext_atto", 32),
    ("timm:vit_tiny_patch16_224", 224),
    ("timm:deit_tiny_patch16_224", 224),
    ("timm:swin_tiny_patch4_window7_224", 224),
    ("timm:densenet121", 32),
    ("timm:ghostnet_100", 32),
    ("torchvision:mobilenet_v3_small", 32),
    ("torchvision:shufflenet_v2_x0_5", 32),
    ("torchvision:resnet50", 32),
]


def _qcli(*args: str) -> tuple[int, dict | None, str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qcli", *args, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - start
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        out = None
    err = next((ln for ln in proc.stderr.splitlines() if ln.startswith("error")), "")
    return proc.returncode, out, err, seconds


def run_row(spec: str, side: int, bits: str, tmp: Path) -> dict:
    data = SHARED / "imagenet-sample"
    qmodel, onnx = tmp / "m.qcli", tmp / "m.onnx"
    common = ["--data", str(data), "--class-list", str(data / "wnids.txt"), "--limit", "16"]
    rc, cal, err, t_cal = _qcli(
        "calibrate", spec, *common, "--image-size", str(side), "--bits", bits,
        "--method", "minmax", "--out", str(qmodel), "--force",
    )  # fmt: skip
    row = {"model": spec, "side": side, "bits": bits, "calibrate_s": round(t_cal, 1)}
    if rc != 0:
        return {**row, "result": "calibrate failed", "error": err}
    row["ops"] = cal["ops"]
    rc, exp, err, t_exp = _qcli("export", str(qmodel), "--out", str(onnx), "--force")
    row["export_s"] = round(t_exp, 1)
    if rc != 0:
        return {**row, "result": "export refused", "error": err}
    runs = exp["check"]["runs"]
    row["check"] = {
        k: {
            "top1_differ_pct": round(r["disagreement_pct"], 2),
            "max_rel": round(r["max_abs_diff"] / r["logit_range"], 4),
        }
        for k, r in runs.items()
    }
    return {**row, "result": "pass"}


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Architecture matrix (random init, through the CLI)",
        "",
        f"`{meta['command']}` — {meta['date']}, CPU flags {meta['cpu_flags']}, "
        f"load {meta['load']}, qcli at {meta['commit']}.",
        "",
        "Each row: `qcli calibrate MODEL --method minmax` on 16 ImageNet-sample images at the "
        "smallest input the model accepts, then `qcli export` (onnx.checker, the static "
        "pair-sum check, simulation vs onnxruntime's reference arithmetic and integer "
        "kernels). Random weights: accuracy means nothing here, agreement does.",
        "",
        "| model | bits | result | integer kernels | float ops | sim≠ORT top-1 % (ref / int) "
        "| max Δlogit / range (ref / int) | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = r.get("ops")
        share = f"{ops['integer_ops']} of {ops['compute_ops']}" if ops else "-"
        floats = ", ".join(f"{k} ×{v}" for k, v in ops["float_ops"].items()) if ops else "-"
        chk = r.get("check", {})
        ref, fused = chk.get("reference", {}), chk.get("integer kernels", {})
        differ = f"{ref.get('top1_differ_pct', '-')} / {fused.get('top1_differ_pct', '-')}"
        rel = f"{ref.get('max_rel', '-')} / {fused.get('max_rel', '-')}"
        result = r["result"] if r["result"] == "pass" else f"{r['result']}: {r['error']}"
        secs = round(r.get("calibrate_s", 0) + r.get("export_s", 0))
        lines.append(
            f"| {r['model']} | {r['bits']} | {result} | {share} | {floats or 'none'} | "
            f"{differ} | {rel} | {secs} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="only the models matching this regex")
    parser.add_argument("--bits", default="w8a8,w4a8")
    parser.add_argument("--out", default="arch_matrix")
    args = parser.parse_args()
    if not (SHARED / "imagenet-sample").is_dir():
        print(f"skipped: {SHARED / 'imagenet-sample'} not found")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, side in ROWS:
            if args.rows and not re.search(args.rows, spec):
                continue
            for bits in args.bits.split(","):
                row = run_row(spec, side, bits, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = run_meta("arch_matrix.py")
    write_outputs(args.out, {"meta": meta, "rows": rows}, render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
