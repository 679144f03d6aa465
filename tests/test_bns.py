"""bns / noise data generation: the BN loss falls, images are valid and seeded, state restored."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcli.errors import QcliError, UsageError
from qcli.methods.generators.bn_stats import BNInputMoments, bn_layers, channel_moments
from qcli.methods.generators.bns import BnsSettings, generate_bns, total_steps
from qcli.methods.generators.images import pixel_bounds
from qcli.methods.generators.noise import NoiseSettings, generate_noise
from qcli.methods.registry import DATA_METHODS
from qcli.models.input_spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec

SPEC = InputSpec(size=(16, 16), mean=IMAGENET_MEAN, std=IMAGENET_STD)
FAST = BnsSettings(num_images=8, batch_size=8, iters=5)


def _tiny_net(bn: bool = True) -> nn.Module:
    """3 conv-BN-ReLU layers whose BN statistics come from "real" images unlike N(0,1) noise.

    The real images are smooth and bright (pixels skewed towards 1), so the stored statistics
    are reachable by some input yet far from what the noise start gives.
    """
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for cin, cout in ((3, 8), (8, 16), (16, 16)):
        layers += [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout) if bn else nn.Identity(),
        ]
        layers.append(nn.ReLU())
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    pixels = nn.functional.interpolate(torch.rand(64, 3, 4, 4), size=16, mode="bilinear").sqrt()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (SPEC.mean, SPEC.std))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the exact statistics of the "real" set
    with torch.no_grad():
        net.train()((pixels - mean) / std)
    return net.eval()


def _reference_bn_loss(net: nn.Module, images: torch.Tensor) -> float:
    """The ZeroQ loss written independently (torch.var_mean, forward hooks) for checking."""
    losses = []

    def hook(module: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        var, mean = torch.var_mean(args[0], dim=(0, 2, 3), unbiased=False)
        d_mean = (mean - module.running_mean).square().sum()
        d_std = (var.sqrt() - module.running_var.sqrt()).square().sum()
        losses.append(((d_mean + d_std) / module.num_features).item())

    handles = [m.register_forward_pre_hook(hook) for m in bn_layers(net)]
    with torch.no_grad():
        net(images)
    for h in handles:
        h.remove()
    return sum(losses) / len(losses)


def test_bn_loss_falls_well_below_the_noise_it_starts_from():
    net = _tiny_net()
    settings = BnsSettings(num_images=8, batch_size=8, iters=40, seed=3)
    images, metrics = generate_bns(net, SPEC, settings)
    noise = NoiseSettings(settings.num_images, settings.batch_size, settings.seed)
    start, _ = generate_noise(net, SPEC, noise)  # the same seeded stream: bns's start
    before, after = _reference_bn_loss(net, start), _reference_bn_loss(net, images)
    assert after < 0.1 * before
    assert metrics["final_bn_loss"] < 0.1 * metrics["initial_bn_loss"]
    assert metrics["initial_bn_loss"] == pytest.approx(before, rel=1e-3)
    assert {"final_bn_loss", "seconds", "iters", "batch_size"} <= set(metrics)


def test_short_last_batch_shape_range_and_progress():
    steps: list[int] = []
    settings = BnsSettings(num_images=10, batch_size=4, iters=3)
    images, metrics = generate_bns(_tiny_net(), SPEC, settings, progress=steps.append)
    assert images.shape == (10, 3, 16, 16)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.is_contiguous()
    lo, hi = pixel_bounds(SPEC, torch.device("cpu"))
    assert bool(((images >= lo) & (images <= hi)).all())
    assert steps == list(range(1, math.ceil(10 / 4) * 3 + 1))
    assert total_steps(settings) == steps[-1]
    assert metrics["iters"] == 3 and metrics["batch_size"] == 4


def test_same_seed_is_bitwise_identical_and_another_seed_differs():
    net = _tiny_net()
    a, _ = generate_bns(net, SPEC, FAST)
    b, _ = generate_bns(net, SPEC, FAST)
    c, _ = generate_bns(net, SPEC, BnsSettings(num_images=8, batch_size=8, iters=5, seed=1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_model_state_is_restored():
    net = _tiny_net().train()
    net[0].bias.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    generate_bns(net, SPEC, FAST)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    assert {name: p.requires_grad for name, p in net.named_parameters()} == flags
    assert all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert all(p.is_contiguous() for p in net.parameters())  # channels_last undone
    assert not any(m._forward_pre_hooks for m in net.modules())


def test_model_without_batchnorm_is_refused():
    with pytest.raises(QcliError, match="BatchNorm"):
        generate_bns(_tiny_net(bn=False), SPEC, FAST)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"num_images": 0}, "--num-images"),
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": 9}, "--batch-size"),
        ({"iters": 0}, "--iters"),
    ],
)
def test_bad_settings_name_the_flag(changes: dict, flag: str):
    settings = BnsSettings(**{"num_images": 8, "batch_size": 8, "iters": 5, **changes})
    with pytest.raises(UsageError, match=flag):
        generate_bns(_tiny_net(), SPEC, settings)


def test_channel_moments_gradient_matches_autograd():
    x = torch.randn(3, 4, 5, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(channel_moments, (x,))
    mean, mean_sq = channel_moments(x)
    assert torch.allclose(mean, x.mean(dim=(0, 2, 3)))
    assert torch.allclose(mean_sq, x.square().mean(dim=(0, 2, 3)))


def test_hooks_see_the_input_of_timm_batchnormact():
    timm_layers = pytest.importorskip("timm.layers")
    bn = timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU).eval()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), bn)
    assert bn_layers(net) == [bn]
    x = torch.randn(2, 3, 5, 5)
    with BNInputMoments([bn]) as hooks:
        net(x)
    mean, _ = hooks.moments[0]
    assert torch.allclose(mean, net[0](x).mean(dim=(0, 2, 3)))
    assert not bn._forward_pre_hooks


def test_noise_is_seeded_clamped_and_batched():
    steps: list[int] = []
    settings = NoiseSettings(num_images=10, batch_size=4, seed=5)
    a, metrics = generate_noise(None, SPEC, settings, progress=steps.append)
    b, _ = generate_noise(None, SPEC, settings)
    lo, hi = pixel_bounds(SPEC, torch.device("cpu"))
    assert a.shape == (10, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert bool(((a >= lo) & (a <= hi)).all()) and float(a.std()) > 0.5
    assert steps == [1, 2, 3] and "seconds" in metrics


def test_both_methods_are_registered():
    assert DATA_METHODS["bns"].run is generate_bns
    assert DATA_METHODS["noise"].run is generate_noise
