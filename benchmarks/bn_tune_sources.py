"""Where data-free calibration loses on EfficientNet-Lite0 W4A8: range setting or BN tuning.

Calibrates MSE ranges on one image set and BN-tunes on another (every pair of the sets
given), and scores the simulation on the held-out imagenet-sample images. `--reference bn`
BN-tunes against each folded BatchNorm's own population statistics (beta, |gamma|) instead
of the float model's statistics on the same images; `--alpha A` applies only that share of
each correction.

    .venv/bin/python benchmarks/bn_tune_sources.py \\
        --set real=benchmarks/.cache/data/imagenet-sample-068e996e156f-s0-calib:32 \\
        --set dgh=OUT/calib-data --ranges real,dgh --tune real,dgh
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import qcli.methods.tuning as tuning
from qcli.data import iterate
from qcli.evaluate import accuracy
from qcli.methods.chain import float_twin
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from qcli.stages import calibrate as stage
from qcli.stages.common import DataOptions, ModelOptions, image_batches, open_dataset
from qcli.ui import SilentUI

EVAL = "benchmarks/.cache/data/imagenet-sample-068e996e156f-s0-eval"


def bn_population(module: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """(beta, |gamma|) of the BatchNorm after each conv: the folded conv's output mean and
    std over the data the BN statistics came from."""
    out, last = {}, None
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            last = name
        elif isinstance(m, nn.BatchNorm2d) and last is not None:
            out[last] = (m.bias.detach().clone(), m.weight.detach().abs().clone())
            last = None
    return out


def population_stats(population: dict[str, tuple[Tensor, Tensor]]) -> Callable:
    own = tuning._layer_stats

    def stats(chain, segment, unit, layer, quantized):
        (name,) = unit.layers
        if quantized or name not in population:
            return own(chain, segment, unit, layer, quantized)
        return population[name]

    return stats


def damped(correct: Callable, alpha: float) -> Callable:
    """`correct` with the float statistics moved only `alpha` of the way from the quantized."""

    def correct_share(layer, q_stats, fp_stats, match_std):
        (mq, sq), (mf, sf) = q_stats, fp_stats
        share = ((mq + alpha * (mf - mq)), (sq + alpha * (sf - sq)))
        return correct(layer, q_stats, share, match_std)

    return correct_share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", required=True, help="NAME=FOLDER[:LIMIT]")
    p.add_argument("--ranges", required=True, help="sets to take MSE ranges from")
    p.add_argument("--tune", required=True, help="sets to BN-tune on")
    p.add_argument("--reference", choices=("images", "bn"), default="images")
    p.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="apply this share of each correction (σ and μ moved α of the way to the float's)",
    )
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--eval", default=EVAL)
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = ModelOptions("builtin:efficientnet_lite0").load()
    spec = loaded.input_spec
    sets = {}
    for item in args.set:
        name, _, where = item.partition("=")
        folder, _, limit = where.partition(":")
        ds = open_dataset(DataOptions(folder, limit=int(limit) if limit else None), spec, 0)
        sets[name] = torch.cat(list(image_batches(ds, 32)))
    plan = QuantPlan.uniform(BitConfig.parse(args.bits), (), "safe")
    evaluation = open_dataset(DataOptions(args.eval), spec, 0)
    if args.reference == "bn":
        tuning._layer_stats = population_stats(bn_population(loaded.module))
    if args.alpha != 1.0:
        tuning.correct_layer = damped(tuning.correct_layer, args.alpha)
    rows = []
    for r in args.ranges.split(","):
        for t in args.tune.split(","):
            start = time.perf_counter()
            qg = capture(loaded.module, (3, *spec.size), plan)
            reference = float_twin(qg)
            stage.run_method(qg, "mse", sets[r].split(32), len(sets[r]), {"seed": 0}, SilentUI())
            if stage.narrowed_layers(qg):
                stage.widen(qg, sets[r], "mse")
            tuning.tune_statistics(qg, reference, sets[t], True, 32)
            stage.fit_bias_grids(qg)
            qg.module.eval()
            top1 = accuracy(qg.module, iterate(evaluation, 50)).top1
            row = {"ranges": r, "tune": t, "reference": args.reference, "alpha": args.alpha}
            row["top1"] = top1
            rows.append({**row, "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
