"""The opened reconstruction engine: plans, input sources, loss/step seams and its own RNG.

The pinned numbers were produced by the engine before it was opened (a closed loop seeding the
global RNG), on a randomly initialised ResNet-20 at W3A4: the seams must not change them.
"""

from __future__ import annotations

import pytest
import torch

from qcli.methods import recipes
from qcli.methods import reconstruction as R
from qcli.methods.chain import Chain, merge_steps, unit_plan
from qcli.methods.range_setting import set_activation_ranges, set_weight_ranges
from qcli.models.resnet_cifar import resnet20
from qcli.quant.capture import capture
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig

# Per-unit loss after reconstruction, and the sum of |parameters| of the model afterwards.
PINNED = {
    "adaround": ([0.647790909, 1.259253621, 3.142658949, 36.129238129, 1296.500366211], 14431.0007),
    "brecq": ([0.647536099, 2.423114777, 6.614421368, 464.701171875, 123.138465881], 14427.9786),
    "qdrop": ([0.647229493, 2.428694725, 6.696215153, 460.985992432, 114.214988708], 14428.7380),
}
PINNED_UNITS = {"adaround": (0, 1, 2, 7, 18), "brecq": (0, 1, 2, 7, 10), "qdrop": (0, 1, 2, 7, 10)}


def _graph(seed: int = 0):
    torch.manual_seed(seed)  # the model's random init only; the engine uses its own generators
    qg = capture(resnet20().eval(), (3, 16, 16), QuantPlan.uniform(BitConfig(3, 4)))
    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    set_weight_ranges(qg, "mse")
    set_activation_ranges(qg, x.split(16), "mse")
    return qg, x


def _settings(method: str) -> R.ReconSettings:
    settings = {"iters": 12, "batch_size": 16, "seed": 5, "eval_images": 48}
    return recipes.settings_for(method, settings)


def _abs_sum(qg) -> float:
    return sum(float(p.double().abs().sum()) for p in qg.module.parameters())


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_opened_engine_reproduces_the_closed_loop(method: str):
    qg, x = _graph()
    results = R.reconstruct(qg, x, _settings(method))
    losses, total = PINNED[method]
    got = [results[i].loss_after for i in PINNED_UNITS[method]]
    assert got == pytest.approx(losses, rel=2e-3)
    assert _abs_sum(qg) == pytest.approx(total, rel=1e-5)


def test_qdrop_ignores_the_global_rng():
    runs = []
    for global_seed in (0, 123):
        qg, x = _graph()
        torch.manual_seed(global_seed)
        results = R.reconstruct(qg, x, _settings("qdrop"))
        runs.append([r.loss_after for r in results])
    assert runs[0] == runs[1]


def test_a_plan_passed_in_is_the_walk():
    qg, x = _graph()
    plan = unit_plan(qg, "block")
    s = _settings("brecq")
    by_name = R.reconstruct(qg, x, s)
    qg2, _ = _graph()
    by_plan = R.reconstruct(qg2, x, s, plan=unit_plan(qg2, "block"))
    assert [r.loss_after for r in by_name] == [r.loss_after for r in by_plan]
    assert len(by_plan) == sum(len(step.units) for step in plan)


def test_merged_steps_form_one_unit_reading_the_first_and_writing_the_last():
    qg, _ = _graph()
    plan = unit_plan(qg, "block")
    merged = merge_steps(plan, [(2, 3), (5, 6, 7)])
    assert len(merged) == len(plan) - 3
    joint = merged[2].units[0]
    assert joint.input == plan[2].segment.input and joint.output == plan[3].segment.output
    assert joint.layers == plan[2].segment.layers + plan[3].segment.layers
    assert merged[4].segment.layers == sum((plan[i].segment.layers for i in (5, 6, 7)), ())
    with pytest.raises(ValueError, match="adjacent"):
        merge_steps(plan, [(2, 4)])
    with pytest.raises(ValueError, match="block or stage"):
        merge_steps(unit_plan(qg, "layer"), [(1, 2)])
    results = R.reconstruct(qg, torch.randn(32, 3, 16, 16), _settings("brecq"), plan=merged)
    assert [r.name for r in results][2] == joint.name


def test_seams_change_the_data_the_loss_and_the_step():
    qg, x = _graph()
    seen: dict[str, int] = {"inputs": 0, "steps": 0, "loss": 0}

    def doubled(chain: Chain, segment, unit):
        seen["inputs"] += 1
        extra = chain.replay(x.flip(-1)).unit_data(segment, unit)  # on-the-fly activations
        base = chain.unit_data(segment, unit)
        return type(base)(
            *(
                torch.cat([a, b])
                for a, b in zip(
                    (base.xq, base.xf, base.y), (extra.xq, extra.xf, extra.y), strict=True
                )
            )
        )

    def loss(pred, target, w):
        seen["loss"] += 1
        return R.reconstruction_loss(pred, target, w)

    def wrap(unit, step):
        def counted(beta):
            seen["steps"] += 1
            return step(beta)

        return counted

    s = _settings("brecq")
    seams = R.Seams(inputs=doubled, loss=loss, wrap_step=wrap)
    results = R.reconstruct(qg, x, s, seams=seams)
    assert seen["inputs"] == len(results)
    assert seen["steps"] == s.iters * len(results)
    assert seen["loss"] >= seen["steps"]


def test_replay_at_the_cut_equals_the_cached_walk():
    qg, x = _graph()
    chain = Chain.start(qg, x, 16, torch.float32)
    plan = unit_plan(qg, "block")
    for step in plan[:4]:
        chain.advance(step.segment)
    again = chain.replay(x)
    assert torch.equal(again.q, chain.q) and torch.equal(again.f, chain.f)


def test_activation_caches_keep_the_models_layout():
    """A channels_last model's cached activations stay channels_last (a contiguous cache
    would be converted back at every step), and the values do not depend on the layout."""
    from qcli.methods.chain import run_batched

    conv = torch.nn.Conv2d(3, 8, 3, padding=1).eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = run_batched(conv, x, 2, torch.device("cpu"), torch.float32)
    assert flat.is_contiguous()
    conv.to(memory_format=torch.channels_last)
    cl = run_batched(
        conv, x.contiguous(memory_format=torch.channels_last), 2, torch.device("cpu"), torch.float32
    )
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    torch.testing.assert_close(cl, flat)
