"""DGH's peak memory as the set grows at a fixed batch size (issue 12: memory bounded by B).

    .venv/bin/python benchmarks/dgh_memory.py [--batch 64] [--iters 3] [--sizes 256 2048]
        [--before /path/to/other/src] [--repeats 1] [--quality-iters 30]
        [--modes moments compact] [--compact-lrs 0.15] [--allocators default fixed]
        [--out benchmarks/results/dgh_memory.json]

Each run is a fresh process (peak RSS is per process: `ru_maxrss`), one after the other, on
the CIFAR ResNet-20 (its trained weights when ../shared/models has them, random otherwise:
memory does not depend on the weights). Rows per idle-state mode (`DghSettings.idle_state`):
"moments" with the default optimizer, "compact" with Adafactor at the first of
`--compact-lrs`. `--before SRC` also runs the chosen modes with that source tree first on
PYTHONPATH (e.g. main's `src`), for the before/after table. The bound is the
issue's: peak RSS at the smallest N plus the bytes of the largest N's output images
(float32 [N, C, H, W]). Writes `--out` and the .md of its name in benchmarks/ (each through a
temporary file and a rename, so a reader never sees half a file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# The shared folder as tests/conftest.py finds it: $QCLI_SHARED_DATA's parent, or ../shared.
SHARED = Path(os.environ.get("QCLI_SHARED_DATA", REPO.parent / "shared" / "data")).parent
WEIGHTS = SHARED / "models" / "resnet20_cifar10.th"
MODEL = "builtin:resnet20_cifar10"
# The settings each idle-state mode runs with, beyond N, B and the iterations.
MODES: dict[str, dict] = {
    "moments": {},
    "compact": {"idle_state": "compact", "optimizer": "adafactor"},
}

WORKER = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from qcli.methods.generators.dgh import DghSettings, generate_dgh
from qcli.models import ModelSource, load_model
spec = json.loads(sys.argv[1])
if spec["weights"]:
    loaded = load_model(ModelSource(spec["model"], weights=spec["weights"]), {})
    module, input_spec = loaded.module, loaded.input_spec
else:
    from qcli.models import resnet20
    from qcli.models.builtin import RESNET20_CIFAR10_SPEC as input_spec
    module = resnet20().eval()
settings = DghSettings(**spec["settings"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
images, metrics = generate_dgh(module, input_spec, settings)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({
    "peak_rss_mib": peak / 1024, "rss_before_generate_mib": before / 1024,
    "image_bytes": images.numel() * images.element_size(), "seconds": round(seconds, 2),
    "final_bn_loss": metrics["final_bn_loss"], "initial_bn_loss": metrics["initial_bn_loss"],
}))
"""


def measure(src: Path, settings: dict, live: bool = False) -> dict:
    """One generation in a fresh process with `src` first on the path; its JSON result.

    `live`: glibc's mmap threshold fixed at its default 128 KiB, so every large block is
    mapped and unmapped and RSS follows what the code holds; with the default dynamic
    threshold, freed blocks stay resident by chance (what a user sees, but noisy)."""
    weights = str(WEIGHTS) if WEIGHTS.exists() else None
    spec = json.dumps({"model": MODEL, "weights": weights, "settings": settings})
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, spec], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mode_settings(mode: str, args: argparse.Namespace) -> dict:
    extra = dict(MODES[mode])
    if mode == "compact":
        extra["lr"] = args.compact_lrs[0]
    return extra


def memory_rows(
    label: str, src: Path, args: argparse.Namespace, live: bool, mode: str
) -> list[dict]:
    """Peak RSS per N (the smallest of `repeats` runs: noise only ever adds), and the bound."""
    rows = []
    for n in args.sizes:
        settings = {"num_images": n, "batch_size": args.batch, "iters": args.iters}
        settings |= mode_settings(mode, args)
        runs = [measure(src, settings, live) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["peak_rss_mib"])
        rows.append(
            {
                "code": label,
                "mode": mode,
                "allocator": "fixed mmap threshold" if live else "default",
                "num_images": n,
                **best,
                "peak_rss_runs_mib": [round(r["peak_rss_mib"], 1) for r in runs],
            }
        )
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["over_smallest_mib"] = r["peak_rss_mib"] - base
        r["bound_mib"] = base + r["image_bytes"] / 2**20
        r["within_bound"] = r["peak_rss_mib"] <= r["bound_mib"]
    return rows


def quality_rows(label: str, src: Path, args: argparse.Namespace, modes: list[str]) -> list[dict]:
    """The set BN loss reached at the smallest N over several batches: packing idle moments
    in bfloat16 or idle images in float16 rounds them, and this is where that would show.
    "moments": RAdam (the default) and Adam at the `quantize` preset's lr; "compact":
    Adafactor at each of `--compact-lrs`, and at the first one with float32 idle images too
    ("moments" mode: Adafactor's own state is small), which isolates the float16 storage."""
    runs = []
    if "moments" in modes:
        runs += [("moments", "radam", 16.0), ("moments", "adam", 0.15)]
    if "compact" in modes:
        runs.append(("moments", "adafactor", args.compact_lrs[0]))
        runs += [("compact", "adafactor", lr) for lr in args.compact_lrs]
    rows = []
    for mode, optimizer, lr in runs:
        settings = {
            "num_images": args.sizes[0],
            "batch_size": args.batch,
            "iters": args.quality_iters,
            "optimizer": optimizer,
            "lr": lr,
        }
        if mode != "moments":
            settings["idle_state"] = mode
        row = {"code": label, "mode": mode, "settings": settings, **measure(src, settings)}
        rows.append(row)
    return rows


def markdown(payload: dict) -> str:
    out = [
        "# DGH peak memory against the number of images",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; {os.cpu_count()} cores ({payload['cpu_flags']}); "
        f"1 torch thread; load average {payload['loadavg_start']} -> {payload['loadavg_end']}",
        f"- {payload['model']} ({payload['weights']} weights), batch {payload['batch_size']}, "
        f"{payload['iters']} iterations, each run a fresh process; peak RSS is `ru_maxrss`, "
        f"the smallest of {payload['repeats']} run(s)",
        *([f"- note: {payload['note']}"] if payload.get("note") else []),
        "- allocator 'default': glibc as users run it (freed blocks may stay resident); "
        "'fixed mmap threshold': `MALLOC_MMAP_THRESHOLD_=131072`, so RSS follows what the "
        "code holds",
        "- bound = peak RSS at the smallest N + the bytes of this N's output images "
        "(float32 [N, C, H, W]), the issue's 'N = 256 plus the images themselves'",
        "",
        "- x images: 'over smallest N' divided by the output bytes of the images added "
        "(N - smallest N). Each image is optimized as float32 with border pixels for the "
        "random crop (36 x 36 for ResNet-20's 32 x 32: 1.27 x its output bytes). Mode "
        "'moments' (idle batches keep float32 images and two bfloat16 moments, as much "
        "again): 2.53 x is its floor. Mode 'compact' (idle batches keep float16 images, "
        "0.64 x, and Adafactor's factored state, a few floats per image row and column) "
        "packs them into the output's own memory, which the final images then overwrite: "
        "the output bytes, 1.0 x, are its floor. 1.0 x is also the issue's bound; the "
        "smallest N holds its own output",
        "",
        "| code | mode | allocator | N | peak RSS MiB | over smallest N MiB | x images | "
        "image MiB | bound MiB | within | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = payload["rows"]
    for r in rows:
        mode = r.get("mode", "moments")
        first = next(
            x
            for x in rows
            if (x["code"], x.get("mode", "moments"), x["allocator"])
            == (r["code"], mode, r["allocator"])
        )
        added = r["image_bytes"] - first["image_bytes"]
        ratio = f"{r['over_smallest_mib'] * 2**20 / added:.2f}" if added else "-"
        out.append(
            f"| {r['code']} | {mode} | {r['allocator']} | {r['num_images']} | "
            f"{r['peak_rss_mib']:.1f} | "
            f"{r['over_smallest_mib']:.1f} | {ratio} | {r['image_bytes'] / 2**20:.1f} | "
            f"{r['bound_mib']:.1f} | {'yes' if r['within_bound'] else 'no'} | "
            f"{r['seconds']:.1f} |"
        )
    if payload["quality"]:
        out += [
            "",
            f"Set BN loss reached (trained weights if present), N = {payload['sizes'][0]}, "
            f"batch {payload['batch_size']}, {payload['quality_iters']} iterations:",
            "",
            "| code | mode | optimizer, lr | initial set BN loss | final set BN loss | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in payload["quality"]:
            s = r["settings"]
            out.append(
                f"| {r['code']} | {r.get('mode', 'moments')} | {s['optimizer']}, {s['lr']} | "
                f"{r['initial_bn_loss']:.4f} | "
                f"{r['final_bn_loss']:.5f} | {r['seconds']:.1f} |"
            )
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quality-iters", type=int, default=30, help="0: no loss rows")
    parser.add_argument("--note", default="", help="a line for the .md (e.g. a shared machine)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--compact-lrs",
        type=float,
        nargs="+",
        default=[0.15],
        help="Adafactor lrs of the compact quality rows; the first also runs the memory rows",
    )
    parser.add_argument(
        "--before", type=Path, help="another source tree to measure first (in the same modes)"
    )
    parser.add_argument(
        "--allocators",
        nargs="+",
        choices=("default", "fixed"),
        default=["default", "fixed"],
        help="glibc as users run it, and/or with the mmap threshold fixed",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "dgh_memory.json")
    parser.add_argument("--render", type=Path, help="only rewrite the .md from this JSON")
    args = parser.parse_args()
    if args.render is not None:
        md = BENCH / (args.render.stem + ".md")
        write_atomic(md, markdown(json.loads(args.render.read_text())))
        return
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    wanted = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
    load0 = [round(x, 2) for x in os.getloadavg()]
    codes = [("before", args.before.resolve())] if args.before is not None else []
    codes.append(("after" if codes else "this", REPO / "src"))
    runs = [(label, src, mode) for label, src in codes for mode in args.modes]
    rows = [
        row
        for live in [a == "fixed" for a in args.allocators]
        for label, src, mode in runs
        for row in memory_rows(label, src, args, live, mode)
    ]
    quality = []
    if args.quality_iters:
        quality = [
            row for label, src in codes for row in quality_rows(label, src, args, args.modes)
        ]
    payload = {
        "command": "python benchmarks/dgh_memory.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_flags": " ".join(f for f in wanted if f" {f}" in flags),
        "loadavg_start": load0,
        "note": args.note,
        "model": MODEL,
        "weights": "trained" if WEIGHTS.exists() else "random",
        "batch_size": args.batch,
        "iters": args.iters,
        "modes": {mode: mode_settings(mode, args) for mode in args.modes},
        "repeats": args.repeats,
        "sizes": args.sizes,
        "quality_iters": args.quality_iters,
        "rows": rows,
        "quality": quality,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(payload, indent=2) + "\n")
    write_atomic(BENCH / (args.out.stem + ".md"), markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
