"""Reconstruction effort against quality: the curve `quantize`'s default effort is chosen from.

`python benchmarks/effort_curve.py --model effl0 --data DIR --eval DIR --points fixed:50,...`

Each point calibrates the same images with the one-shot recipe (QDrop + BN tuning at
`quantize --bits 4`'s widths) at one effort setting (`fixed:N`: every unit N iterations;
`plateau:N`: N is a ceiling and units stop when their loss stops improving), then scores the
simulation on held-out images. Every run is a fresh `qcli` process, one after the other;
wall seconds, reconstruction steps and top-1 go to benchmarks/results/effort-<model>.json and
benchmarks/effort-<model>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

MODELS = {
    "effl0": ["builtin:efficientnet_lite0"],
    "r20": ["builtin:resnet20_cifar10", "--weights", "/work/shared/models/resnet20_cifar10.th"],
}


def qcli(*args: str) -> dict:
    """One qcli command in a fresh process; its --json result."""
    cmd = [sys.executable, "-m", "qcli", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def point(model: list[str], data: str, eval_data: str, bits: str, spec: str, out: Path) -> dict:
    mode, iters = spec.split(":")
    start = time.perf_counter()
    cal = qcli(
        "calibrate",
        *model,
        "--data",
        data,
        "--bits",
        bits,
        "--method",
        "qdrop",
        "--bn-tune",
        "--iters",
        iters,
        "--stop",
        mode,
        "--out",
        str(out),
        "--force",
    )
    seconds = time.perf_counter() - start
    units = cal["reconstruction"]["units"]
    top1 = qcli("eval", str(out), "--data", eval_data, "--no-latency")["top1"]
    return {
        "point": spec,
        "calibrate_s": round(seconds, 1),
        "reconstruction_s": round(sum(u["seconds"] for u in units), 1),
        "steps": sum(u["steps"] for u in units),
        "steps_per_unit": {u["name"]: u["steps"] for u in units},
        "top1": top1,
    }


def markdown(p: dict) -> str:
    out = [
        f"# Reconstruction effort against quality: {p['model']} {p['bits']}",
        "",
        f"- command: `{p['command']}`",
        f"- date: {p['date']}; {os.cpu_count()} cores, CPU flags {' '.join(p['cpu_flags'])}; "
        f"python {platform.python_version()}; load average at start {p['loadavg_start']}, "
        f"at end {p['loadavg_end']}",
        f"- calibration images: `{p['data']}`; evaluation: `{p['eval']}` "
        "(simulation top-1, held out)",
        "",
        "`fixed:N` runs N iterations in every unit; `plateau:N` stops a unit's free phase when "
        "two 10-step windows in a row fail to beat its best mean loss by 2% (one window, "
        "against the previous, before commit 'plateau patience'), then anneals four times as "
        "long, within N.",
        "",
        "| effort | calibrate s | reconstruction s | steps (all units) | top-1 |",
        "|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        out.append(
            f"| {r['point']} | {r['calibrate_s']:.0f} | {r['reconstruction_s']:.0f} | "
            f"{r['steps']} | {r['top1']:.2f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    from suites.common import cpu_flags, loadavg

    from qcli.artifacts.atomic import atomic_file

    def atomic_write_text(path: Path, text: str) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(text)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--data", required=True, help="calibration image folder")
    parser.add_argument("--eval", required=True, help="held-out image folder")
    parser.add_argument("--bits", default="w4a8")
    parser.add_argument("--points", default="fixed:50,plateau:200,fixed:100,plateau:500")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    args = parser.parse_args()
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu_flags": cpu_flags(),
        "loadavg_start": loadavg(),
        "model": args.model,
        "bits": args.bits,
        "data": args.data,
        "eval": args.eval,
        "rows": [],
    }
    name = f"effort-{args.model}{'-' + args.tag if args.tag else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.points.split(","):
            row = point(MODELS[args.model], args.data, args.eval, args.bits, spec, Path(tmp) / "q")
            payload["rows"].append(row)
            print(json.dumps(row), flush=True)
            payload["loadavg_end"] = loadavg()
            (BENCH / "results").mkdir(exist_ok=True)
            atomic_write_text(BENCH / "results" / f"{name}.json", json.dumps(payload, indent=2))
            atomic_write_text(BENCH / f"{name}.md", markdown(payload))


if __name__ == "__main__":
    main()
