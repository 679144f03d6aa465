"""qcli's DGH beside the authors' own (Sony MCT 2.6.1), same model, images, iterations, batch.

    .venv/bin/python benchmarks/mct_side_by_side.py [--images 32] [--iters 50] [--batch 32]
        [--threads 2]

MCT runs in its own venv (benchmarks/.mct-venv, see benchmarks/README.md) through
`suites/mct_worker.py`, in a fresh process; qcli's generators run in fresh processes too, one
after the other, so no two runs share the cores. Every image set is scored by the same
yardstick, qcli's set-level BN loss (`bn_stats.set_bn_loss`), and the rows give seconds,
images/second and the loss reached. Writes benchmarks/results/mct.json and benchmarks/mct.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MCT_PY = BENCH / ".mct-venv" / "bin" / "python"
MODEL = "builtin:efficientnet_lite0"


def qcli_rows(equal_loss_iters: int | None = None) -> list[tuple[str, str, dict]]:
    """(key, label, DghSettings overrides). MCT's defaults are RAdam at lr 16 with set-level
    statistics, smoothing, augmentation and the min-max output loss: the first row is qcli's
    DGH at those same settings, the second the preset `qcli quantize` uses, read from the code
    (tests/test_dgh.py checks that results/mct.json measured the current preset)."""
    from qcli.stages.quantize import GEN_PRESETS

    rows = [
        ("mct-settings", "qcli DGH, MCT's settings (RAdam, lr 16)", {}),
        ("quantize-preset", "qcli DGH, `quantize` preset", dict(GEN_PRESETS["dgh"])),
    ]
    if equal_loss_iters:  # fewer iterations: time to reach about MCT's loss
        label = f"qcli DGH, `quantize` preset at {equal_loss_iters} iterations"
        overrides = {**GEN_PRESETS["dgh"], "iters": equal_loss_iters}
        rows.append(("preset-short", label, overrides))
    return rows


QCLI_WORKER = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from qcli.methods.generators.dgh import DghSettings, generate_dgh
from qcli.models import ModelSource, load_model
import numpy as np
loaded = load_model(ModelSource(sys.argv[1]), {})
s = DghSettings(**json.loads(sys.argv[2]))
t = time.perf_counter()
images, _ = generate_dgh(loaded.module, loaded.input_spec, s)
seconds = time.perf_counter() - t
np.save(sys.argv[4], images.numpy())
print(json.dumps({"seconds": round(seconds, 2)}))
"""


def set_loss(npy: Path) -> float:
    import numpy as np
    import torch

    from qcli.methods.generators.bn_stats import set_bn_loss
    from qcli.models import ModelSource, load_model

    loaded = load_model(ModelSource(MODEL), {})
    return set_bn_loss(loaded.module, torch.from_numpy(np.load(npy)), 16)


def _worker(cmd: list[str], env: dict[str, str]) -> dict:
    """Run one generator in a fresh process; its last stdout line is its JSON result."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {cmd[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    size = {"num_images": args.images, "batch_size": args.batch, "iters": args.iters}
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        if MCT_PY.exists():
            out = Path(tmp) / "mct.npy"
            spec = json.dumps({"model": MODEL, "threads": args.threads, **size})
            worker = BENCH / "suites" / "mct_worker.py"
            t = time.perf_counter()
            res = _worker([str(MCT_PY), str(worker), spec, str(out)], env)
            rows.append(
                {
                    "key": "mct",
                    "label": f"Sony MCT {res['mct_version']} (experimental data generation)",
                    "seconds": res["seconds"],
                    "process_seconds": round(time.perf_counter() - t, 1),
                    "set_bn_loss": set_loss(out),
                }
            )
        for key, label, overrides in qcli_rows(args.equal_loss_iters):
            out = Path(tmp) / "qcli.npy"
            settings = json.dumps({**size, **overrides})
            cmd = [sys.executable, "-c", QCLI_WORKER, MODEL, settings, str(args.threads), str(out)]
            res = _worker(cmd, env)
            rows.append(
                {
                    "key": key,
                    "label": label,
                    "settings": {**size, **overrides},
                    "seconds": res["seconds"],
                    "set_bn_loss": set_loss(out),
                }
            )
    for r in rows:
        r["images_per_second"] = round(args.images / r["seconds"], 3)
    return {"model": MODEL, **size, "threads": args.threads, "rows": rows}


def markdown(payload: dict) -> str:
    import platform

    flags = payload.get("cpu_flags", "")
    out = [
        "# DGH beside Sony MCT's data generation",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; {os.cpu_count()} cores ({flags}); {platform.python_version()}",
        f"- load average at start {payload['loadavg_start']}, at end {payload['loadavg_end']}",
        "",
        f"{payload['model']}: {payload['num_images']} images, {payload['iters']} iterations, "
        f"batch {payload['batch_size']}, {payload['threads']} torch threads, each run in a "
        "fresh process, one after the other. 'set BN loss' is the same yardstick for every "
        "row (the BN-statistics loss of the image set as a whole; lower is closer).",
        "",
        "| generator | seconds | images/s | set BN loss |",
        "|---|---|---|---|",
    ]
    for r in payload["rows"]:
        out.append(
            f"| {r['label']} | {r['seconds']:.1f} | {r['images_per_second']:.3f} | "
            f"{r['set_bn_loss']:.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    from qcli.stages.quantize import QuantizeConfig as Q

    d = {f.name: f.default for f in fields(Q)}  # the data-free preset's size by default
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=d["gen_images"])
    parser.add_argument("--iters", type=int, default=d["gen_iters"])
    parser.add_argument("--batch", type=int, default=d["gen_batch_size"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--equal-loss-iters",
        type=int,
        help="also run the preset at this many iterations (time to reach MCT's loss)",
    )
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    wanted = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
    cpu_flags = " ".join(f for f in wanted if f" {f}" in flags)
    load0 = list(os.getloadavg())
    payload = {
        "command": "python benchmarks/mct_side_by_side.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_flags": cpu_flags,
        "loadavg_start": load0,
        **run(args),
        "loadavg_end": list(os.getloadavg()),
    }
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "mct.json").write_text(json.dumps(payload, indent=2) + "\n")
    (BENCH / "mct.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
