"""Simulation against onnxruntime, image by image and tensor by tensor (issue 26).

`python benchmarks/exact_sim.py [--r20-images 10000] [--tag after]` calibrates ResNet-20
(MSE ranges, 256 cifar10/train images) and EfficientNet-Lite0 (MSE ranges and BN tuning, 64
images of the benchmark's calibration split) at W8A8, W4A8 and W4A4 through the CLI,
exports each, and compares on r20's cifar10/test images and effl0's 400 evaluation images:

- classes: the share of images whose top-1 differs between the file under onnxruntime's
  integer kernels and (a) the training-time fake-quant simulation, (b) the integer-exact
  simulation (`quant.exact`, when the checkout has it), (c) onnxruntime's reference
  arithmetic (graph optimizations off);
- tensors: how many of the activation quantizers' outputs (and the logits) are not bit
  identical between the file and the integer-exact simulation over all images;
- cost: seconds to evaluate the images in each simulation (torch, one thread).

Run from an older checkout (PYTHONPATH=<old>/src) it measures (a) and (c) only: the
"before" rows. Writes benchmarks/results/exact_sim[-TAG].json and benchmarks/exact_sim[-TAG].md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from suites.common import md_table, run_meta, shared_data, split_imagenet_sample  # noqa: E402

BITS = ("w8a8", "w4a8", "w4a4")


def _qcli(*args: object) -> dict:
    cmd = [sys.executable, "-m", "qcli", *map(str, args), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"qcli {args[0]} failed: {proc.stderr.strip()[-600:]}")
    return json.loads(proc.stdout)


def _images(path: Path, spec, limit: int | None) -> torch.Tensor:
    from qcli.data import iterate, open_data

    ds = open_data(path, spec, limit=limit, seed=0)
    return torch.cat([x for x, _ in iterate(ds, 250)])


def _session(path: Path, names: list[str], optimize: bool = True):
    import onnxruntime as ort

    model = onnx.load(str(path))
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(qmodel: Path, onnx_path: Path, x: torch.Tensor, batch: int = 100) -> dict:
    from qcli.stages.common import load_qmodel

    try:
        from qcli.quant.exact import run_exact
    except ImportError:
        run_exact = None
    qm = load_qmodel(qmodel)
    gm = qm.graph.module.eval()
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    names = json.loads(meta.get("qcli_quantizer_codes", "{}")) if run_exact else {}
    fused = _session(onnx_path, list(names.values()))
    reference = _session(onnx_path, [], optimize=False)
    differ = {"fake-quant": 0, "exact": 0, "reference": 0}
    tensor_differ: set[str] = set()
    seconds = {"fake-quant": 0.0, "exact": 0.0}
    float_ops: list[str] = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        outs = fused.run(None, {"input": xb.numpy()})
        top = torch.from_numpy(outs[0]).argmax(1)
        start = time.perf_counter()
        with torch.no_grad():
            fake = gm(xb)
        seconds["fake-quant"] += time.perf_counter() - start
        differ["fake-quant"] += int((fake.argmax(1) != top).sum())
        ref = reference.run(None, {"input": xb.numpy()})[0]
        differ["reference"] += int((torch.from_numpy(ref).argmax(1) != top).sum())
        if run_exact is None:
            continue
        start = time.perf_counter()
        res = run_exact(gm, xb, record=True)
        seconds["exact"] += time.perf_counter() - start
        float_ops = res.float_ops
        differ["exact"] += int((res.logits.argmax(1) != top).sum())
        if not torch.equal(res.logits, torch.from_numpy(outs[0])):
            tensor_differ.add("logits")
        for (q, _), got in zip(names.items(), outs[1:], strict=True):
            if not np.array_equal(got.astype(np.float32), res.codes[q].numpy()):
                tensor_differ.add(q)
    n = len(x)
    row = {
        "images": n,
        "fake_quant_differ_pct": 100 * differ["fake-quant"] / n,
        "reference_differ_pct": 100 * differ["reference"] / n,
        "fake_quant_s": seconds["fake-quant"],
    }
    if run_exact is not None:
        row |= {
            "exact_differ_pct": 100 * differ["exact"] / n,
            "tensors": len(names) + 1,
            "tensors_differ": len(tensor_differ),
            "exact_s": seconds["exact"],
            "float_ops": len(float_ops),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r20-images", type=int, default=10000)
    ap.add_argument("--models", default="r20,effl0")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = shared_data()
    calib, evaluation = split_imagenet_sample(data / "imagenet-sample")
    weights = data.parent / "models" / "resnet20_cifar10.th"
    models = {
        "r20": (
            ["builtin:resnet20_cifar10", "--weights", weights, "--data", data / "cifar10/train"],
            ["--limit", 256],
            data / "cifar10" / "test",
            args.r20_images,
        ),
        "effl0": (
            ["builtin:efficientnet_lite0", "--data", calib],
            ["--limit", 64],
            evaluation,
            None,
        ),
    }
    rows = []
    from qcli.stages.common import load_qmodel

    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            source, limit, eval_data, n_eval = models[key]
            x = None
            for bits in BITS:
                q, o = Path(tmp) / f"{key}-{bits}.qcli", Path(tmp) / f"{key}-{bits}.onnx"
                _qcli("calibrate", *source, *limit, "--bits", bits, "--method", "mse", "--out", q)
                _qcli("export", q, "--out", o)
                if x is None:
                    x = _images(eval_data, load_qmodel(q).input_spec, n_eval)
                row = {"model": key, "bits": bits, **measure(q, o, x)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = run_meta("exact_sim.py")
    suite = "exact_sim" + (f"-{args.tag}" if args.tag else "")
    payload = {**meta, "rows": rows}
    header = [
        "model",
        "bits",
        "images",
        "fake-quant ≠ ORT int (top-1)",
        "exact ≠ ORT int (top-1)",
        "tensors not bit-identical",
        "ORT reference ≠ ORT int (top-1)",
        "eval s fake-quant / exact",
    ]
    table = [
        [
            r["model"],
            r["bits"],
            r["images"],
            f"{r['fake_quant_differ_pct']:.2f}%",
            f"{r['exact_differ_pct']:.2f}%" if "exact_differ_pct" in r else "—",
            f"{r['tensors_differ']} of {r['tensors']}" if "tensors" in r else "—",
            f"{r['reference_differ_pct']:.2f}%",
            f"{r['fake_quant_s']:.1f} / {r['exact_s']:.1f}"
            if "exact_s" in r
            else f"{r['fake_quant_s']:.1f} / —",
        ]
        for r in rows
    ]
    md = "\n".join(
        [
            "# Simulation against onnxruntime's integer kernels"
            + (f" ({args.tag})" if args.tag else ""),
            "",
            f"- command: `{meta['command']}` at commit `{meta['commit']}`, {meta['date']}",
            f"- CPU flags: {meta['cpu_flags']}; load {meta['load']}; onnxruntime "
            f"{meta.get('onnxruntime', '?')}, one thread each side",
            "- r20: MSE ranges on 256 cifar10/train images, scored on cifar10/test; effl0: MSE "
            "ranges + BN tuning on 64 images of the calibration split, scored on the 400 "
            "evaluation images.",
            "",
            md_table(header, table),
        ]
    )
    from suites.common import write_outputs

    write_outputs(suite, payload, md)


if __name__ == "__main__":
    main()
