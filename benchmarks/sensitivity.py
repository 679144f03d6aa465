"""Measured against estimated sensitivities for bit allocation (issue 25, item 1).

For each model, `allocate-bits --max-size 4bit` runs twice, `--sensitivity measure` (one
forward of the model per quantizer and width) and `--sensitivity estimate` (one forward and one
backward pass per batch and width, `methods/second_order.py`); each plan is calibrated with
MSE ranges (`calibrate --bit-config --method mse`), exported, and scored in onnxruntime on the
held-out images. The table gives both sensitivity times, the rank agreement (Spearman) of the
per-quantizer KL at every width, and the two plans' top-1.

    .venv/bin/python benchmarks/sensitivity.py [--models r20 effl0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from suites.common import run_meta, split_imagenet_sample, write_outputs  # noqa: E402

MODES = ("measure", "estimate")
DATA = REPO.parent / "shared" / "data"


def models() -> dict[str, dict]:
    calib, held_out = split_imagenet_sample(DATA / "imagenet-sample")
    r20 = REPO.parent / "shared" / "models" / "resnet20_cifar10.th"
    return {
        "r20": {
            "model": ["builtin:resnet20_cifar10", "--weights", str(r20)],
            "calib": [str(DATA / "cifar10" / "train"), "--images", "1024"],
            "eval": str(DATA / "cifar10" / "test"),
            "bits": ["--weight-bits", "2,3,4,8", "--act-bits", "4,8"],
            "desc": "1,024 cifar10/train images; top-1 on all 10,000 cifar10/test images",
        },
        "effl0": {
            "model": ["builtin:efficientnet_lite0"],
            "calib": [str(calib), "--images", "100"],
            "eval": str(held_out),
            "bits": ["--weight-bits", "2,3,4,8", "--act-bits", "8"],
            "desc": "the benchmark's 100 calibration images; top-1 on the other 400",
        },
    }


def qcli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "qcli", *args, "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def run_model(key: str, m: dict, tmp: Path) -> dict:
    rows, kls = {}, {}
    for mode in MODES:
        bits = tmp / f"{key}-{mode}.json"
        start = time.perf_counter()
        alloc = qcli(
            "allocate-bits", *m["model"], "--data", *m["calib"], *m["bits"],
            "--max-size", "4bit", "--sensitivity", mode, "--out", str(bits),
        )  # fmt: skip
        wall = time.perf_counter() - start
        units = json.loads(bits.read_text())["sensitivities"]["units"]
        kls[mode] = {
            (u["name"], b): k for u in units for b, k in zip(u["bits"], u["kl"], strict=True)
        }
        qm, onnx = tmp / f"{key}-{mode}.qcli", tmp / f"{key}-{mode}.onnx"
        data = m["calib"][0]
        qcli("calibrate", *m["model"], "--data", data, "--bit-config", str(bits),
             "--method", "mse", "--out", str(qm))  # fmt: skip
        qcli("export", str(qm), "--out", str(onnx))
        ev = qcli("eval", str(onnx), "--data", m["eval"], "--no-latency")
        widths = sorted(set(alloc["weight_bits"].values()))
        rows[mode] = {
            "sensitivity_s": alloc["sensitivity_seconds"],
            "allocate_s": round(wall, 1),
            "top1": ev["top1"],
            "weight_bytes": alloc["size_bytes"],
            "budget_bytes": alloc["budget"]["value"],
            "weight_widths": {
                b: sum(v == b for v in alloc["weight_bits"].values()) for b in widths
            },
        }
        print(f"{key} {mode}: {rows[mode]}", flush=True)
    agree = {}
    for b in sorted({b for _, b in kls["measure"]}):
        keys = [k for k in kls["measure"] if k[1] == b and kls["measure"][k] > 0]
        if len(keys) > 2:
            a = [kls["measure"][k] for k in keys]
            e = [kls["estimate"][k] for k in keys]
            agree[b] = {
                "quantizers": len(keys),
                "spearman": round(spearman(a, e), 3),
                "sum_ratio": round(sum(e) / sum(a), 3),
            }
    return {"desc": m["desc"], "modes": rows, "agreement": agree}


def table(results: dict) -> str:
    lines = []
    for key, r in results.items():
        lines += [
            f"## {key}",
            "",
            f"{r['desc']}; `--max-size 4bit`, MSE calibration of the plan.",
            "",
            "| sensitivity | seconds | plan (layers per weight width) | weight bytes / budget "
            "| onnxruntime top-1 |",
            "|---|---|---|---|---|",
        ]
        for mode, row in r["modes"].items():
            plan = ", ".join(f"{n}×{b}b" for b, n in row["weight_widths"].items())
            lines.append(
                f"| {mode} | {row['sensitivity_s']} | {plan} | {row['weight_bytes']:,.0f} / "
                f"{row['budget_bytes']:,.0f} | {row['top1']} |"
            )
        t = r["modes"]
        speed = t["measure"]["sensitivity_s"] / t["estimate"]["sensitivity_s"]
        lines += ["", f"Estimate / measure time: x{1 / speed:.2f} ({speed:.1f}x faster).", ""]
        lines += ["| width | quantizers | Spearman (KL ranks) | Σ estimate / Σ measured |"]
        lines += ["|---|---|---|---|"]
        for b, a in r["agreement"].items():
            lines.append(f"| {b} | {a['quantizers']} | {a['spearman']} | {a['sum_ratio']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["r20", "effl0"])
    ap.add_argument("--out", default="sensitivity")
    args = ap.parse_args()
    meta = run_meta("sensitivity.py")
    all_models = models()
    results = {}
    with tempfile.TemporaryDirectory(prefix="qcli-sens-") as tmp:
        for key in args.models:
            results[key] = run_model(key, all_models[key], Path(tmp))
    meta = {**meta, "load_after": run_meta("sensitivity.py")["load"]}
    head = [
        "# Bit allocation: measured against estimated sensitivities",
        "",
        f"- command: `{meta['command'].strip()}` at commit `{meta['commit']}`, {meta['date']}",
        f"- CPU flags: {meta['cpu_flags']}; load {meta['load']} -> {meta['load_after']}; "
        f"onnxruntime {meta['onnxruntime']}",
        "",
        "",
    ]
    write_outputs(args.out, {"meta": meta, "results": results}, "\n".join(head) + table(results))


if __name__ == "__main__":
    main()
