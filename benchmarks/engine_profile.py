"""Reconstruction engine profile: the fused fake-quantizer against the composed graph, or
channels_last against contiguous activations.

    .venv/bin/python benchmarks/engine_profile.py [--models r20,effl0] [--bits w4a4,w4a8]
        [--iters N] [--repeats N] [--threads 2] [--micro-repeats 5] [--skip-micro]
        [--compare quantizer|layout] [--out engine]

Defaults: 20 iterations per unit and 2 repeats for r20, 3 and 1 for effl0 (~5 min in all).

Two measurements, each interleaving the two implementations so load changes hit both alike:
- micro: forward + backward of one 16x96x112x112 activation (an EfficientNet-Lite0 expand
  output at batch 16) on a uint4 grid with a learned scale: the composed graph, the fused node
  (each also with a QDrop mask), and torch's own fake-quantize ops for reference (those
  multiply by 1/scale, so they are not QuantizeLinear-exact);
- engine: QDrop reconstruction (block units, 32 random images, batch 32, a few iterations
  per unit) of r20 and effl0; every iteration is timed through the progress callback, and
  each unit's median seconds per iteration is reported (the first iteration of a unit, which
  includes its setup, is left out). Quantizers run composed when `Quantizer.fused` is False.

Writes benchmarks/results/engine.json and benchmarks/engine.md. Weights: r20 from
$QCLI_SHARED_DATA/../models (random when absent), effl0 its embedded ImageNet weights (random
when the package is missing); timing does not depend on them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as qcli does

import argparse
import copy
import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suites import common

from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.methods.recipes import settings_for
from qcli.methods.reconstruction import reconstruct
from qcli.models.builtin import build_architecture
from qcli.models.spec import ModelSource, load_model
from qcli.quant import primitives as P
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.quantizer import Quantizer
from qcli.quant.spec import BitConfig

MICRO_SHAPE = (16, 96, 112, 112)
IMAGES = 32
MODELS = {"r20": "builtin:resnet20_cifar10", "effl0": "builtin:efficientnet_lite0"}
ITERS = {"r20": 20, "effl0": 3}  # per unit; the first of each unit is not timed
REPEATS = {"r20": 2, "effl0": 1}


def median_ms(samples: list[float]) -> float:
    return round(1e3 * statistics.median(samples), 1)


# -------------------------------------------------------------------------------- micro


def micro(repeats: int) -> dict[str, Any]:
    """Forward+backward (and forward only, no grad) of each variant, medians over repeats."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MICRO_SHAPE, generator=g) * 0.5
    grad = torch.randn(MICRO_SHAPE, generator=g)
    scale0, zp0, qmin, qmax = torch.tensor(0.05), torch.tensor(7.0), 0, 15

    def ours(fq: Callable, drop: Callable | None) -> Callable[[bool], None]:
        def step(backward: bool) -> None:
            keep = drop() if drop else None
            if not backward:
                with torch.no_grad():
                    fq(x, scale0, zp0, qmin, qmax, keep=keep)
                return
            xg, s = x.detach().requires_grad_(True), scale0.clone().requires_grad_(True)
            fq(xg, s, zp0, qmin, qmax, keep=keep).backward(grad)

        return step

    def torch_fq(backward: bool) -> None:
        xg = x.detach().requires_grad_(backward)
        y = torch.fake_quantize_per_tensor_affine(xg, 0.05, 7, qmin, qmax)
        if backward:
            y.backward(grad)

    def torch_lsq(backward: bool) -> None:
        xg = x.detach().requires_grad_(backward)
        s, z = scale0.reshape(1).clone(), zp0.reshape(1).clone()
        s.requires_grad_(backward)
        z.requires_grad_(backward)
        y = torch._fake_quantize_learnable_per_tensor_affine(xg, s, z, qmin, qmax, 1.0)
        if backward:
            y.backward(grad)

    def old_mask() -> torch.Tensor:
        return torch.rand_like(x) < 0.5

    def new_mask() -> torch.Tensor:
        return P.random_mask(x.shape, 0.5, x.device)

    variants: dict[str, Callable[[bool], None]] = {
        "composed": ours(P.fake_quantize_composed, None),
        "fused": ours(P.fake_quantize, None),
        "composed + QDrop mask (rand_like)": ours(P.fake_quantize_composed, old_mask),
        "fused + QDrop mask (random_mask)": ours(P.fake_quantize, new_mask),
        "torch.fake_quantize_per_tensor_affine (x grad only)": torch_fq,
        "torch._fake_quantize_learnable_per_tensor_affine": torch_lsq,
    }
    masks = {"rand_like(x) < p": old_mask, "random_mask(p)": new_mask}
    times: dict[str, dict[str, list[float]]] = {k: {"fwd_bwd": [], "fwd": []} for k in variants}
    mask_times: dict[str, list[float]] = {k: [] for k in masks}
    for r in range(repeats):
        order = list(variants.items())
        for name, step in order if r % 2 == 0 else order[::-1]:
            for kind, backward in (("fwd_bwd", True), ("fwd", False)):
                t = time.perf_counter()
                step(backward)
                times[name][kind].append(time.perf_counter() - t)
        for name, make in masks.items():
            t = time.perf_counter()
            make()
            mask_times[name].append(time.perf_counter() - t)
        common.log(f"micro repeat {r + 1}/{repeats}")
    return {
        "shape": list(MICRO_SHAPE),
        "grid": "uint4 asymmetric per-tensor, learned scale (requires grad)",
        "repeats": repeats,
        "bit_identical": _identical(x, grad, scale0, zp0, qmin, qmax),
        "variants": {
            k: {kind: median_ms(v) for kind, v in t.items()} | {"samples_s": t}
            for k, t in times.items()
        },
        "masks": {k: {"ms": median_ms(v), "samples_s": v} for k, v in mask_times.items()},
    }


def _identical(x, grad, scale0, zp0, qmin, qmax) -> bool:
    """Fused and composed give the same bits (values, dx, dscale) on the benchmark tensor."""
    out = []
    for fq in (P.fake_quantize, P.fake_quantize_composed):
        xg, s = x.detach().requires_grad_(True), scale0.clone().requires_grad_(True)
        y = fq(xg, s, zp0, qmin, qmax)
        y.backward(grad)
        out.append([y.detach(), xg.grad, s.grad])
    return all(
        torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(*out, strict=True)
    )


# ------------------------------------------------------------------------------- engine


def load(key: str) -> tuple[torch.nn.Module, tuple[int, int, int], str]:
    spec = MODELS[key]
    if key == "r20":
        path = common.shared_data().parent / "models" / "resnet20_cifar10.th"
        if path.is_file():
            return (
                load_model(ModelSource(spec, weights=str(path))).module,
                (3, 32, 32),
                "pretrained",
            )
        torch.manual_seed(0)
        return build_architecture(spec).module.eval(), (3, 32, 32), "random"
    try:
        return load_model(ModelSource(spec)).module, (3, 224, 224), "pretrained"
    except Exception:  # the weights package is optional for timing
        arch = build_architecture(spec, num_classes=1000)
        return arch.module.float().eval(), (3, 224, 224), "random"


def _stamper(stamps: list[float]) -> Callable[..., None]:
    """A progress callback that records when each iteration ended (a skip, which reports the
    iterations a unit did not run, is no iteration)."""

    def stamp(n: int, label: str | None = None, skip: int = 0) -> None:
        if n:
            stamps.append(time.perf_counter())

    return stamp


# What each comparison sets up on a copy of the captured model and on the images: the first
# mode is the baseline of the speedup column.
COMPARISONS: dict[str, tuple[str, str]] = {
    "quantizer": ("composed", "fused"),
    "layout": ("contiguous", "channels_last"),
}


def _setup(q, images: torch.Tensor, mode: str) -> torch.Tensor:
    """Quantizers composed or fused (fused unless `composed`); channels_last moves the
    weights and the images into that layout (every activation then follows)."""
    for m in q.module.modules():
        if isinstance(m, Quantizer):
            m.fused = mode != "composed"
    if mode == "channels_last":
        q.module.to(memory_format=torch.channels_last)
        return images.contiguous(memory_format=torch.channels_last)
    return images


def engine(key: str, bits: str, iters: int, repeats: int, compare: str) -> dict[str, Any]:
    module, shape, weights = load(key)
    images = torch.randn(IMAGES, *shape, generator=torch.Generator().manual_seed(0))
    qg = capture(module, shape, QuantPlan.uniform(BitConfig.parse(bits)))
    set_weight_ranges(qg, "minmax")
    set_activation_ranges(qg, images.split(IMAGES), "minmax")
    settings = settings_for("qdrop", {"iters": iters, "batch_size": IMAGES, "eval_images": IMAGES})
    base, other = COMPARISONS[compare]
    per_mode: dict[str, dict[str, list[float]]] = {base: {}, other: {}}
    wall: dict[str, list[float]] = {base: [], other: []}
    units: list[str] = []
    for r in range(repeats):
        for mode in [base, other] if r % 2 == 0 else [other, base]:
            q = copy.deepcopy(qg)
            x = _setup(q, images, mode)
            stamps: list[float] = []
            t = time.perf_counter()
            results = reconstruct(q, x, settings, _stamper(stamps))
            wall[mode].append(time.perf_counter() - t)
            units = [u.name for u in results]
            for i, name in enumerate(units):
                mine = stamps[i * iters : (i + 1) * iters]
                steps = [b - a for a, b in itertools.pairwise(mine)]
                per_mode[mode].setdefault(name, []).extend(steps)
            common.log(f"{key} {bits} {mode} repeat {r + 1}/{repeats}: {wall[mode][-1]:.1f} s")
    rows = []
    for name in units:
        b, o = (statistics.median(per_mode[m][name]) for m in (base, other))
        rows.append(
            {
                "unit": name,
                f"{base}_it_s": round(1 / b, 2),
                f"{other}_it_s": round(1 / o, 2),
                "speedup": round(b / o, 2),
                "samples_s": {m: per_mode[m][name] for m in per_mode},
            }
        )
    total = {m: sum(statistics.median(per_mode[m][n]) for n in units) for m in per_mode}
    return {
        "model": key,
        "bits": bits,
        "weights": weights,
        "modes": [base, other],
        "iters_per_unit": iters,
        "repeats": repeats,
        "units": rows,
        "seconds_per_iteration_all_units": {m: round(v, 3) for m, v in total.items()},
        "speedup_all_units": round(total[base] / total[other], 2),
        "wall_s": {m: [round(v, 1) for v in w] for m, w in wall.items()},
    }


# ------------------------------------------------------------------------------- output


def _modes(run: dict[str, Any]) -> tuple[str, str]:
    """The two modes a run compared (runs from before `--compare` compared quantizers)."""
    return tuple(run.get("modes", COMPARISONS["quantizer"]))  # type: ignore[return-value]


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Reconstruction engine: " + " vs ".join(_modes(payload.get("engine", [{}])[0])),
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; wall time {payload['wall_s']:.0f} s; load average at start "
        f"{payload['loadavg_start']}, at end {payload['loadavg_end']}",
        f"- git commit `{payload['git_commit'][:12]}`, src hash `{payload['src_hash']}`; "
        f"torch {payload['torch']} with {payload['torch_threads']} thread(s), "
        f"OMP_WAIT_POLICY={payload['omp_wait_policy']}; {payload['cores']} cores, CPU flags "
        f"{' '.join(payload['cpu_flags'])}",
        "- medians over interleaved repeats; the machine is shared, so compare columns of one "
        "run rather than runs",
        "",
    ]
    m = payload.get("micro")
    if m:
        lines += [
            f"## Micro-benchmark: one {'x'.join(map(str, m['shape']))} activation, {m['grid']}",
            "",
            f"{m['repeats']} repeats; fused = composed bit for bit (values, dx, dscale): "
            f"{m['bit_identical']}.",
            "",
            common.md_table(
                ["variant", "forward+backward ms", "forward (no grad) ms"],
                [[k, v["fwd_bwd"], v["fwd"]] for k, v in m["variants"].items()],
            ),
            "",
            common.md_table(["QDrop mask", "ms"], [[k, v["ms"]] for k, v in m["masks"].items()]),
            "",
        ]
    for run in payload.get("engine", []):
        secs = run["seconds_per_iteration_all_units"]
        base, other = _modes(run)
        lines += [
            f"## {run['model']} {run['bits']} QDrop reconstruction ({run['weights']} weights)",
            "",
            f"{IMAGES} images, batch {IMAGES}, {run['iters_per_unit']} iterations per unit, "
            f"{run['repeats']} repeat(s); one iteration over all units: {base} "
            f"{secs[base]} s, {other} {secs[other]} s (x{run['speedup_all_units']}).",
            "",
            common.md_table(
                ["unit", f"{base} it/s", f"{other} it/s", "speedup"],
                [
                    [u["unit"], u[f"{base}_it_s"], u[f"{other}_it_s"], u["speedup"]]
                    for u in run["units"]
                ],
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="r20,effl0")
    parser.add_argument("--bits", default="w4a4,w4a8")
    parser.add_argument("--iters", type=int, help="per unit, every model (default: ITERS)")
    parser.add_argument("--repeats", type=int, help="every model (default: REPEATS)")
    parser.add_argument("--micro-repeats", type=int, default=5)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compare",
        choices=list(COMPARISONS),
        default="quantizer",
        help="quantizer: composed vs fused fake-quantizers; layout: contiguous vs channels_last "
        "(both fused)",
    )
    parser.add_argument("--out", default="engine", help="stem of the JSON and markdown files")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/engine_profile.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": common.loadavg(),
        **common.environment(),
    }
    t0 = time.perf_counter()
    if not args.skip_micro:
        payload["micro"] = micro(args.micro_repeats)
    payload["engine"] = [
        engine(key, bits, args.iters or ITERS[key], args.repeats or REPEATS[key], args.compare)
        for key in args.models.split(",")
        if key
        for bits in args.bits.split(",")
    ]
    payload["wall_s"] = round(time.perf_counter() - t0, 1)
    payload["loadavg_end"] = common.loadavg()
    common.write_outputs(args.out, payload, markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
