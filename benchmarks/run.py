"""qcli benchmark harness: `python benchmarks/run.py [--suite S] [--quick] [--no-cache]`.

Writes benchmarks/results/<suite>.json (every number, the command, git commit, core count,
date, load averages) and benchmarks/<suite>.md (the tables). The protocol is ../shared's
BENCHMARKS.md. Suites whose material (QCLI_SHARED_DATA, default ../shared/data) is missing
are skipped with a message and exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (qcli does it too)
sys.path.insert(0, str(Path(__file__).resolve().parent))

SUITES = ("ptq", "deploy", "datagen", "bits", "qat")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="a few minutes, for development")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute cached calibrations and exports"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only redo benchmarks/<suite>.md from benchmarks/results/<suite>.json",
    )
    parser.add_argument(
        "--models",
        help="comma-separated subset (r20,effl0); results go to <suite>-<models>.json so two "
        "processes can share the cores, then `--merge` joins them into <suite>.json",
    )
    parser.add_argument("--merge", action="store_true", help="join <suite>-*.json files")
    parser.add_argument(
        "--rows",
        help="ptq: only the rows whose label matches this regex (gap-table rows are named "
        "'gap: <label>'; the iterations sweep runs only without --rows)",
    )
    parser.add_argument(
        "--bits", help="ptq: only these comma-separated bit widths (e.g. w4a4,w4a8), gap table too"
    )
    parser.add_argument(
        "--tag", help="write <suite>.<tag>.json/.md instead of the suite's own table"
    )
    parser.add_argument("--epochs", type=int, help="qat: epochs of every row [10; quick: 1]")
    parser.add_argument("--seeds", help="qat: seeds of the 10%% coreset rows [0,1,2; quick: 0]")
    parser.add_argument("--interval", type=int, help="qat: epochs between coreset choices [E//5]")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch
    from suites import common

    torch.set_num_threads(common.TORCH_THREADS)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    if args.merge:
        for name in names:
            _merge(name)
        return 0
    if args.render:
        for name in names:
            _render(name, args.quick, args.tag)
        return 0
    data = common.shared_data()
    if not data.is_dir():
        print(f"benchmarks skipped: shared data folder '{data}' not found (set QCLI_SHARED_DATA)")
        return 0
    missing = _missing(data, names)
    command = " ".join([".venv/bin/python benchmarks/run.py", *(argv or sys.argv[1:])])
    ctx = common.Context(quick=args.quick, use_cache=not args.no_cache, command=command, data=data)
    ctx.models = tuple(args.models.split(",")) if args.models else None
    ctx.epochs = args.epochs
    ctx.seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    ctx.interval = args.interval
    ctx.rows = args.rows
    ctx.bits = tuple(args.bits.lower().split(",")) if args.bits else None
    ctx.tag = args.tag
    ctx.env = common.environment()
    common.prune_cache(ctx.cache)
    for name in names:
        if missing.get(name):
            print(f"suite {name} skipped: missing {', '.join(missing[name])}")
            continue
        _run_suite(ctx, name)
    return 0


def _missing(data: Path, names: list[str]) -> dict[str, list[str]]:
    need = [
        data / "cifar10" / "train",
        data / "cifar10" / "test",
        data.parent / "models" / "resnet20_cifar10.th",
        data / "imagenet-sample" / "wnids.txt",
    ]
    gone = [str(p) for p in need if not p.exists()]
    return {n: gone for n in names}


def _run_suite(ctx, name: str) -> None:
    import importlib

    from suites import common

    module = importlib.import_module(f"suites.{name}")
    common.log(f"suite {name} start{' (quick)' if ctx.quick else ''}")
    la0 = common.loadavg()
    t0 = time.perf_counter()
    body = module.run(ctx)
    payload = {
        "suite": name,
        "quick": ctx.quick,
        "command": ctx.command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "loadavg_start": la0,
        "loadavg_end": common.loadavg(),
        **ctx.env,
        "src_hash_end": common.src_hash(),
        **body,
    }
    if payload["src_hash_end"] != ctx.env["src_hash"]:
        common.log("warning: files under src/ changed during the run (see src_hash_end)")
    payload = json.loads(json.dumps(payload, default=str))  # what the JSON file holds
    stem = _stem(name, ctx.quick, ctx.tag)
    if ctx.models and not ctx.tag:
        stem += f"-{'-'.join(ctx.models)}"
    common.write_outputs(stem, payload, module.markdown(payload))
    common.log(f"suite {name} done in {payload['wall_s']:.0f} s")


def _stem(name: str, quick: bool, tag: str | None = None) -> str:
    """Quick runs write <suite>.quick.json/.md (git-ignored) and tagged subsets
    <suite>.<tag>.json/.md: never over the full results."""
    if tag:
        return f"{name}.{tag}"
    return f"{name}.quick" if quick else name


def _merge(name: str) -> None:
    """Join per-model result files of one suite (run side by side) into <suite>.json/.md."""
    import importlib

    from suites import common

    parts = sorted(common.RESULTS.glob(f"{name}-*.json"))
    if not parts:
        print(f"suite {name}: nothing to merge")
        return
    payloads = [json.loads(p.read_text()) for p in parts]
    merged = {**payloads[0], "merged_from": [p.name for p in parts]}
    for key in ("models", "sweeps"):
        merged[key] = {k: v for p in payloads for k, v in p.get(key, {}).items()}
    merged["runs"] = [
        {k: p[k] for k in ("command", "date", "wall_s", "loadavg_start", "loadavg_end")}
        for p in payloads
    ]
    module = importlib.import_module(f"suites.{name}")
    common.write_outputs(name, merged, module.markdown(merged))


def _render(name: str, quick: bool, tag: str | None = None) -> None:
    import importlib

    from suites import common

    stem = _stem(name, quick, tag)
    path = common.RESULTS / f"{stem}.json"
    if not path.is_file():
        print(f"suite {name}: no {path} to render")
        return
    payload = json.loads(path.read_text())
    module = importlib.import_module(f"suites.{name}")
    common.write_outputs(stem, None, module.markdown(payload))


if __name__ == "__main__":
    sys.exit(main())
