"""`qcli allocate-bits`: model + calibration data + budget -> bits.json (a mixed-precision plan).

Measures every quantizer's sensitivity at every candidate width (or reuses the measurements
stored in an earlier bits.json), solves the allocation, checks it by measuring the whole
mixed model, and writes bits.json: the plan `calibrate --bit-config` reads, the budget it
met, the solver's status, objective and time, and the sensitivities it used.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcli.artifacts import atomic_file, prepare_output
from qcli.artifacts.atomic import write_manifest
from qcli.errors import QcliError, UsageError
from qcli.methods.bit_allocation import (
    SOLVERS,
    Allocation,
    Budget,
    Unit,
    allocate,
    bops_total,
    drop_total,
    uniform,
    weight_bytes,
)
from qcli.methods.sensitivity import (
    SENSITIVITY_MODES,
    count_measurements,
    measure_plan,
    sensitivity_units,
)
from qcli.models import LoadedModel
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import MAX_BITS, MIN_BITS
from qcli.stages.common import (
    DataOptions,
    ModelOptions,
    device,
    image_batches,
    open_dataset,
    require_python_module,
)
from qcli.ui import UI

BITS_FORMAT = "qcli-bits"
BITS_VERSION = 1
BUDGET_FLAGS = {
    "size": "--max-size",
    "ratio": "--max-size-ratio",
    "bops": "--max-bops",
    "drop": "--max-drop",
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bit|bits|b|kb|mb|gb|kib|mib|gib)?\s*$", re.I)
_UNITS = {
    None: 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_WXAY = re.compile(r"^\s*w(\d)a(\d)\s*$", re.I)


@dataclass(frozen=True)
class BudgetRequest:
    """A budget as typed: a number in its unit, or a uniform width whose cost it stands for
    (`--max-size 4bit`: the size of uniform 4-bit weights; `--max-bops w4a8`)."""

    kind: str  # size | ratio | bops | drop
    value: float | None = None
    weight_bits: int | None = None
    act_bits: int | None = None

    def resolve(self, units: list[Unit]) -> Budget:
        """The budget in the solver's units: bytes, bit-operations, or percent."""
        if self.weight_bits is not None:
            bits = uniform(units, self.weight_bits, self.act_bits or MAX_BITS)
            if self.kind == "size":
                return Budget("size", weight_bytes(units, bits))
            return Budget("bops", bops_total(units, bits))
        assert self.value is not None
        if self.kind == "ratio":  # share of the float32 weights, as in the paper's D
            return Budget("size", self.value * weight_bytes(units, uniform(units, 32, 32)))
        if self.kind == "bops":
            return Budget("bops", self.value * 1e9)
        return Budget(self.kind, self.value)

    def describe(self) -> str:
        if self.weight_bits is not None:
            if self.kind == "size":
                return f"size of uniform {self.weight_bits}-bit weights"
            return f"bit-operations of uniform w{self.weight_bits}a{self.act_bits}"
        unit = {"size": " bytes", "ratio": " of FP32 size", "bops": " G bit-ops", "drop": "%"}
        return f"{self.kind} {self.value:g}{unit[self.kind]}"


def parse_budget(kind: str, text: str) -> BudgetRequest:
    """Parse one budget flag; anything unreadable is a usage error naming the flag."""
    flag = BUDGET_FLAGS[kind]
    t = str(text).strip().lower()
    if kind == "size":
        m = _SIZE_RE.match(t)
        if m and m.group(2) in ("bit", "bits"):
            b = float(m.group(1))
            if b.is_integer() and MIN_BITS <= b <= MAX_BITS:
                return BudgetRequest("size", weight_bits=int(b))
        elif m:
            value = float(m.group(1)) * _UNITS[m.group(2)]
            if value > 0:
                return BudgetRequest("size", value=value)
        raise UsageError(
            f"{flag}: '{text}' is not a size; write bytes with a unit (e.g. 120KB, 0.5MB, "
            "2MiB) or the size of uniform weights (e.g. 4bit)"
        )
    if kind == "bops":
        m = _WXAY.match(t)
        if m and all(MIN_BITS <= int(g) <= MAX_BITS for g in m.groups()):
            return BudgetRequest("bops", weight_bits=int(m.group(1)), act_bits=int(m.group(2)))
    try:
        value = float(t)
    except ValueError:
        value = float("nan")
    ok = {"ratio": 0 < value <= 1, "bops": value > 0, "drop": 0 <= value <= 100}[kind]
    if not ok:
        what = {
            "ratio": "a share of the float32 size in (0, 1], e.g. 0.14",
            "bops": "giga bit-operations per image (e.g. 2.5) or a uniform width (e.g. w4a8)",
            "drop": "a top-1 drop in percent from 0 to 100, e.g. 1.5",
        }[kind]
        raise UsageError(f"{flag}: '{text}' is not {what}")
    return BudgetRequest(kind, value=value)


def parse_widths(flag: str, text: str) -> tuple[int, ...]:
    """`2,3,4,8` -> (2, 3, 4, 8); empty or out-of-range lists are usage errors."""
    try:
        widths = tuple(sorted({int(p) for p in str(text).split(",") if p.strip()}))
    except ValueError:
        raise UsageError(f"{flag}: '{text}' is not a comma-separated list of bit widths") from None
    if not widths:
        raise UsageError(f"{flag}: give at least one bit width, e.g. 4,8")
    bad = [b for b in widths if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise UsageError(f"{flag}: {bad[0]} bits is out of range ({MIN_BITS} to {MAX_BITS})")
    return widths


SENSITIVITY_METRICS = {
    "measure": "kl: KL(float || only this quantizer at this width), nats; drop_pct: "
    "confidence lost on the float top-1 class, 100 * mean max(0, p_float - p_quant)",
    "estimate": "kl: second-order estimate of KL(float || only this quantizer at this width), "
    "nats, from one forward and one backward pass per batch (methods/second_order.py)",
}


@dataclass(frozen=True)
class AllocateConfig:
    model: ModelOptions
    data: DataOptions | None
    out: Path | None
    budget: BudgetRequest
    weight_bits: tuple[int, ...] = (2, 3, 4, 8)
    act_bits: tuple[int, ...] = (8,)
    solver: str = "ip"
    keep_fp: tuple[str, ...] = ()
    int8_range: str = "safe"
    images: int = 256  # calibration images the sensitivities are measured on
    sensitivities: Path | None = None  # reuse the measurements of an earlier bits.json
    sensitivity: str = "measure"  # or "estimate" (methods/sensitivity.py, SENSITIVITY_MODES)
    verify: bool = True  # measure the chosen plan as a whole (predicted vs measured)
    seed: int = 0
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def allocate_bits(cfg: AllocateConfig, ui: UI) -> dict[str, Any]:
    if cfg.solver not in SOLVERS:
        raise UsageError(f"--solver must be one of {SOLVERS}")
    if cfg.data is None and cfg.sensitivities is None:
        raise UsageError("allocate-bits needs --data (calibration images) or --sensitivities")
    if cfg.sensitivity not in SENSITIVITY_MODES:
        raise UsageError(f"--sensitivity must be one of {', '.join(SENSITIVITY_MODES)}")
    if cfg.budget.kind == "drop" and cfg.sensitivity == "estimate":
        raise UsageError(
            "--max-drop sums the confidence each quantizer loses, which --sensitivity estimate "
            "does not give: use --sensitivity measure"
        )
    inputs = {**cfg.model.input_files(), "--sensitivities": cfg.sensitivities}
    if cfg.data is not None:
        inputs |= cfg.data.input_files()
    if cfg.out is not None:
        prepare_output(cfg.out, cfg.force, inputs=inputs)
    torch.manual_seed(cfg.seed)
    loaded = cfg.model.load(ui)
    require_python_module(loaded, "allocate bits for")
    base = QuantPlan(
        max(cfg.weight_bits), max(cfg.act_bits), keep_fp=cfg.keep_fp, int8_range=cfg.int8_range
    )
    shape = (3, *loaded.input_spec.size)
    images = _images(cfg, loaded) if cfg.data is not None else None
    if cfg.sensitivities is not None:
        units, sens_info = _reuse(cfg, loaded)
    else:
        units, sens_info = _measure(cfg, loaded, base, images, ui)
    if cfg.budget.kind == "drop" and not all(u.drop for u in units):
        raise UsageError(
            "--max-drop sums the confidence each quantizer loses, which only measured "
            "sensitivities have: use --sensitivity measure"
        )
    budget = cfg.budget.resolve(units)
    with ui.task(f"solve ({cfg.solver})", total=None):
        alloc = allocate(units, budget, cfg.solver, seed=cfg.seed)
    plan = plan_of(base, units, alloc)
    measured = None
    if cfg.verify and images is not None:
        with ui.task("measure the allocation", total=None):
            s = measure_plan(loaded.module, shape, plan, images, cfg.data.batch_size)
        measured = {"kl": s.kl, "flips_pct": s.flips_pct, "drop_pct": s.lost_pct}
    doc = bits_document(cfg, loaded, plan, units, budget, alloc, measured, sens_info)
    if cfg.out is not None:
        with atomic_file(cfg.out) as tmp:
            write_manifest(tmp, doc)
    _summary_table(units, alloc, ui)
    return {
        "out": str(cfg.out) if cfg.out else None,
        "model": loaded.name,
        "budget": doc["budget"],
        **alloc.to_dict(),
        "measured": measured,
        "weight_bits": dict(plan.weights),
        "act_bits": dict(plan.activations),
        "sensitivity_seconds": sens_info.get("seconds"),
    }


def plan_of(base: QuantPlan, units: list[Unit], alloc: Allocation) -> QuantPlan:
    w = {u.name: alloc.bits[u.name] for u in units if u.kind == "weight"}
    a = {u.name: alloc.bits[u.name] for u in units if u.kind == "act"}
    return dataclasses.replace(base, weights=w, activations=a)


def _images(cfg: AllocateConfig, loaded: LoadedModel) -> torch.Tensor:
    data = dataclasses.replace(cfg.data, limit=cfg.data.limit or cfg.images)
    ds = open_dataset(data, loaded.input_spec, cfg.seed)
    return torch.cat(list(image_batches(ds, data.batch_size))).to(device())


def _measure(cfg, loaded, base, images, ui) -> tuple[list[Unit], dict[str, Any]]:
    start = time.perf_counter()
    shape = (3, *loaded.input_spec.size)
    from qcli.quant.capture import capture

    probe = capture(loaded.module, shape, base)
    n_layers = sum(1 for _, layer in probe.layers() if layer.weight_quantizer is not None)
    n_acts = sum(1 for _ in probe.act_quantizers())
    mode = cfg.sensitivity
    total = count_measurements(n_layers, n_acts, cfg.weight_bits, cfg.act_bits, mode)
    with ui.task(f"sensitivity ({mode})", total=total) as advance:
        units = sensitivity_units(
            loaded.module,
            shape,
            base,
            cfg.weight_bits,
            cfg.act_bits,
            images,
            cfg.data.batch_size,
            advance,
            mode,
        )
    info = {
        "mode": mode,
        "metric": SENSITIVITY_METRICS[mode],
        "calibration": "mse ranges per width",
        "images": int(images.shape[0]),
        "data": str(cfg.data.path),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return units, info


def _reuse(cfg: AllocateConfig, loaded: LoadedModel) -> tuple[list[Unit], dict[str, Any]]:
    doc = read_bits(cfg.sensitivities)
    if doc.get("checksum") != loaded.checksum:
        raise QcliError(
            f"--sensitivities '{cfg.sensitivities}' was measured on other weights than "
            f"{loaded.name} has (checksum mismatch)"
        )
    units = [unit_from(d) for d in doc.get("sensitivities", {}).get("units", [])]
    for u in units:
        want = cfg.weight_bits if u.kind == "weight" else cfg.act_bits
        missing = sorted(set(want) - set(u.bits))
        if missing:
            raise UsageError(
                f"--sensitivities '{cfg.sensitivities}' has no measurement of {u.name} at "
                f"{missing[0]} bits; measure again with that width"
            )
    units = [_restrict(u, cfg.weight_bits if u.kind == "weight" else cfg.act_bits) for u in units]
    info = {**doc["sensitivities"].get("info", {}), "reused_from": str(cfg.sensitivities)}
    return units, info


def _restrict(u: Unit, widths: tuple[int, ...]) -> Unit:
    idx = [u.bits.index(b) for b in sorted(widths)]
    return dataclasses.replace(
        u,
        bits=tuple(u.bits[i] for i in idx),
        deg=tuple(u.deg[i] for i in idx),
        drop=tuple(u.drop[i] for i in idx) if u.drop else (),
    )


def unit_to(u: Unit) -> dict[str, Any]:
    return {
        "name": u.name,
        "kind": u.kind,
        "bits": list(u.bits),
        "kl": list(u.deg),
        "drop_pct": list(u.drop),
        "params": u.params,
        "macs": u.macs,
        "input": u.input_unit,
    }


def unit_from(d: dict[str, Any]) -> Unit:
    try:
        return Unit(
            d["name"],
            d["kind"],
            tuple(d["bits"]),
            tuple(float(v) for v in d["kl"]),
            tuple(float(v) for v in d.get("drop_pct", [])),
            int(d.get("params", 0)),
            int(d.get("macs", 0)),
            d.get("input"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"bits.json: malformed sensitivity entry {d!r:.80} ({e})") from e


def bits_document(cfg, loaded, plan, units, budget, alloc, measured, sens_info) -> dict[str, Any]:
    fp32 = weight_bytes(units, uniform(units, 32, 32))
    return {
        "format": BITS_FORMAT,
        "version": BITS_VERSION,
        "model": loaded.name,
        "source": loaded.source.to_dict(),
        "checksum": loaded.checksum,
        "plan": plan.to_dict(),
        "budget": {
            "requested": cfg.budget.describe(),
            "kind": budget.kind,
            "value": budget.value,
            "met": _met(units, alloc, budget),
        },
        "allocation": {
            **alloc.to_dict(),
            "fp32_weight_bytes": fp32,
            "measured": measured,
        },
        "candidates": {"weight": list(cfg.weight_bits), "act": list(cfg.act_bits)},
        "sensitivities": {"info": sens_info, "units": [unit_to(u) for u in units]},
        **cfg.extra,
    }


def _met(units: list[Unit], alloc: Allocation, budget: Budget) -> bool:
    value = {
        "size": weight_bytes(units, alloc.bits),
        "bops": bops_total(units, alloc.bits),
        "drop": drop_total(units, alloc.bits),
    }[budget.kind]
    return value <= budget.value + 1e-9


def read_bits(path: Path) -> dict[str, Any]:
    """A bits.json, checked for its format; errors name the file."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"bit config '{path}' does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"bit config '{path}' is not readable JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != BITS_FORMAT:
        raise UsageError(f"'{path}' is not a qcli bits.json (format {BITS_FORMAT})")
    if doc.get("version", 0) > BITS_VERSION:
        raise UsageError(f"'{path}' is bits.json version {doc['version']}, newer than this qcli")
    return doc


def read_plan(path: Path) -> QuantPlan:
    """The plan a bits.json carries (what `calibrate --bit-config` uses)."""
    doc = read_bits(path)
    if "plan" not in doc:
        raise UsageError(f"bit config '{path}' has no 'plan'")
    return QuantPlan.from_dict(doc["plan"], f"bit config '{path}'")


def _summary_table(units: list[Unit], alloc: Allocation, ui: UI) -> None:
    counts: dict[str, dict[int, int]] = {"weight": {}, "act": {}}
    for u in units:
        b = alloc.bits[u.name]
        counts[u.kind][b] = counts[u.kind].get(b, 0) + 1
    rows = [
        (kind, b, n, f"{100 * n / max(sum(c.values()), 1):.0f}%")
        for kind, c in counts.items()
        for b, n in sorted(c.items())
    ]
    ui.table("chosen widths", ["quantizers", "bits", "count", "share"], rows)
