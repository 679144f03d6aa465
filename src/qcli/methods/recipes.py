"""The reconstruction methods as recipes over the engine (`methods/reconstruction.py`).

A recipe is the engine's settings preset, plus optional ingredients: a unit-plan provider
(MRECG, `methods/mrecg.py`, under --granularity mrecg) and an input provider (MetaAug,
`methods/metaaug.py`, under --metaaug, as `Seams.inputs`).

| method   | unit  | what is learned                                            | QDrop | MetaAug |
|----------|-------|------------------------------------------------------------|-------|---------|
| adaround | layer | up/down rounding of weights                                | -     | -       |
| adaquant | layer | weights, biases, weight and activation step sizes (STE)    | -     | yes     |
| brecq    | block | rounding + activation step sizes, jointly                  | -     | yes     |
| qdrop    | block | as brecq, with activation quantization randomly dropped    | 0.5   | yes     |

BRECQ here is the joint variant (QDrop's harness with nothing dropped, as MRECG runs it), so
QDrop with drop probability 0 is BRECQ exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from qcli.errors import UsageError
from qcli.methods import metaaug, mrecg
from qcli.methods import reconstruction as engine
from qcli.methods.chain import unit_plan
from qcli.methods.range_setting import fit_bias_grids
from qcli.methods.registry import Capabilities, register_calibration, setting
from qcli.quant.capture import QuantGraph
from qcli.quant.partition import GRANULARITIES

# Unit plans a recipe can reconstruct: a partition, or a plan provider's.
PLAN_PROVIDERS = ("mrecg",)


@dataclass(frozen=True)
class PlanSettings:
    """Which units a recipe tunes: a partition, or MRECG's merged blocks (None: the
    method's own partition)."""

    granularity: str | None = setting(
        "--granularity",
        "Reconstruction unit [adaround, adaquant: layer; brecq, qdrop: block]; mrecg: "
        "blocks, the adjacent pairs with the largest capacity gaps merged (brecq, qdrop).",
        choices=(*GRANULARITIES, *PLAN_PROVIDERS),
    )


@dataclass(frozen=True)
class Recipe:
    summary: str
    preset: dict[str, Any]  # the engine settings that make the method
    metaaug: bool  # takes MetaAug's input source


RECIPES: dict[str, Recipe] = {
    "adaround": Recipe(
        "layer-wise learned up/down rounding (AdaRound)",
        {"granularity": "layer", "learn_act_scales": False},
        metaaug=False,
    ),
    "adaquant": Recipe(
        "layer-wise weights, biases and step sizes (AdaQuant, sequential)",
        {"granularity": "layer", "rounding": False, "learn_weights": True},
        metaaug=True,
    ),
    "brecq": Recipe(
        "block reconstruction: rounding + activation step sizes (BRECQ)",
        {"granularity": "block"},
        metaaug=True,
    ),
    "qdrop": Recipe(
        "BRECQ with activation quantization randomly dropped (QDrop)",
        {"granularity": "block", "drop_prob": 0.5},
        metaaug=True,
    ),
}


@dataclass(frozen=True)
class Prepared:
    """A recipe's typed settings: the engine's, and its ingredients' (None: not used)."""

    method: str
    granularity: str  # as asked: a partition or a plan provider
    engine: engine.ReconSettings
    mrecg: mrecg.MrecgSettings | None = None
    metaaug: metaaug.MetaAugSettings | None = None
    input_norm: dict[str, Any] | None = field(default=None, compare=False)

    def report(self) -> dict[str, Any]:
        """The settings as the manifest records them: one flat table."""
        m = self.mrecg or mrecg.MrecgSettings()
        return {**asdict(self.engine), "granularity": self.granularity, **asdict(m)}


def _pick(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in settings.items() if k in names and v is not None}


def prepare(method: str, settings: dict[str, Any]) -> Prepared:
    """A recipe's settings from the calibration settings dict, checked (unknown keys are
    ignored: they belong to other stages, e.g. BN tuning)."""
    recipe = RECIPES[method]
    meta = metaaug.meta_settings(settings)  # meta flags need --metaaug; values checked
    given = _pick(engine.ReconSettings, settings)
    granularity = given.pop("granularity", recipe.preset["granularity"])
    if granularity == "mrecg" and recipe.preset["granularity"] == "layer":
        raise UsageError(
            f"--granularity mrecg merges blocks: it applies to brecq and qdrop, not {method}"
        )
    if granularity not in (*GRANULARITIES, *PLAN_PROVIDERS):
        choices = ", ".join((*GRANULARITIES, *PLAN_PROVIDERS))
        raise UsageError(f"--granularity must be one of {choices}")
    flags = mrecg.MrecgSettings(**_pick(mrecg.MrecgSettings, settings))
    plans = flags if granularity == "mrecg" else None
    mrecg.validate(plans, flags)
    base = "block" if granularity == "mrecg" else granularity
    s = replace(engine.ReconSettings(), **{**recipe.preset, **given, "granularity": base})
    engine.validate(s)
    return Prepared(method, granularity, s, plans, meta, settings.get("input_norm"))


def settings_for(method: str, settings: dict[str, Any]) -> engine.ReconSettings:
    """The engine settings of a method with the user's settings over its preset."""
    return prepare(method, settings).engine


def total_steps(qg: QuantGraph, method: str, settings: dict[str, Any], images: int) -> int:
    """The progress total: iterations weighted by each unit's cost (`unit_cost`), so the time
    left that the bar estimates holds across units of very different sizes (MRECG's merged
    plan costs what the block plan does, plus the loss-capacity base pass)."""
    r = prepare(method, settings)
    s = engine.within_budget(qg, r.engine, images)
    base = r.mrecg.base_pass_iters(s.iters) if r.mrecg else 0
    return (s.iters + base) * engine.plan_cost(qg, unit_plan(qg, s.granularity))


def run(
    qg: QuantGraph, method: str, images: Tensor, settings: dict[str, Any], progress=None
) -> dict[str, Any]:
    """Range-initialize, choose the units, reconstruct them and refit the bias grids."""
    r = prepare(method, settings)
    s = engine.within_budget(qg, r.engine, images.shape[0])
    engine.init_ranges(qg, images, s)
    if r.mrecg is not None:
        choice = mrecg.choose_plan(qg, s, r.mrecg, images, progress)
    else:
        choice = mrecg.PlanChoice(unit_plan(qg, s.granularity))
    meta = None
    if r.metaaug is not None:
        meta = metaaug.source(qg, images, s, r.metaaug, r.input_norm, progress)
    seams = engine.Seams(inputs=meta) if meta is not None else engine.Seams()
    results = engine.reconstruct(qg, images, s, progress, choice.plan, seams=seams)
    widened = fit_bias_grids(qg)
    report = replace(r, engine=s).report()
    recon: dict[str, Any] = {"settings": report, "units": [asdict(u) for u in results]}
    if choice.decision is not None:
        recon["mrecg"] = choice.decision.to_dict()
    recon["oscillation"] = mrecg.oscillation_report(qg, choice, results)
    recon["peak_rss_mb"] = round(engine.peak_rss_mb(), 1)
    return {
        "images": images.shape[0],
        "reconstruction": recon,
        "bias_grid_channels_widened": widened,
        **({"metaaug": meta.report()} if meta is not None else {}),
    }


def _validator(method: str):
    def validate(settings: dict[str, Any]) -> None:
        prepare(method, settings)

    return validate


def _registered(method: str):
    def calibrate(qg: QuantGraph, batches: Iterable[Tensor], settings=None, progress=None):
        return run(qg, method, torch.cat(list(batches)), settings or {}, progress)

    return calibrate


for _name, _recipe in RECIPES.items():
    register_calibration(
        _name,
        _recipe.summary,
        settings=(
            PlanSettings,
            engine.ReconSettings,
            mrecg.MrecgSettings,
            *((metaaug.MetaAugFlags,) if _recipe.metaaug else ()),
        ),
        capabilities=Capabilities(reconstructs=True),
        total=lambda qg, n, st, m=_name: total_steps(qg, m, st, n),
        validate=_validator(_name),
    )(_registered(_name))
