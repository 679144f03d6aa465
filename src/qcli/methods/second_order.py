"""How much the model's output distribution moves when one module's output moves, for many
modules at once: a second-order estimate of KL(p ‖ p with that change), from one forward and a
few backward passes per batch.

For logits z and a small change Δz, KL(softmax(z) ‖ softmax(z + Δz)) ≈ ½ Δzᵀ F Δz, with
F = diag(p) − ppᵀ the Fisher of the softmax. A module whose output y changes by Δy moves the
logits by Δz ≈ J Δy (J = ∂z/∂y). With a random vector v such that E[vvᵀ] = F (v = F^½ r for
Rademacher r), ½ E[(vᵀ J Δy)²] = ½ Δyᵀ Jᵀ F J Δy: one backward pass of vᵀz gives vᵀJ at every
module together, so each draw costs one backward for all of them (Hutchinson's trick on the
Gauss-Newton form). The int8 widening pass ranks layers this way, and bit allocation may
estimate its per-quantizer sensitivities with it instead of one forward per quantizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# (module, its input tensors, its output) -> the change of its output to weigh (no grad)
Change = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]


@dataclass(frozen=True)
class EstimateSettings:
    batch: int = 32  # images per forward/backward
    # Random vectors per batch. Averaging over the images already settles the estimate: on
    # EfficientNet-Lite0 (100 images) 1, 4 and 16 draws rank the layers alike against the
    # measured KL (Spearman 0.83 / 0.83 / 0.83 at 4 bits), 16 draws costing 6x 1 draw.
    draws: int = 1
    seed: int = 0


def output_kl(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    sites: Mapping[str, tuple[nn.Module, Change]],
    settings: EstimateSettings = EstimateSettings(),
) -> dict[str, float]:
    """KL(model's output ‖ output with site n's change applied alone), estimated for every
    site at once over the images `x` (batch mean, nats)."""
    if not sites:  # one candidate width: nothing to tell apart
        return {}
    sums = dict.fromkeys(sites, 0.0)
    gen = torch.Generator().manual_seed(settings.seed)
    outs: dict[str, Tensor] = {}
    changes: dict[str, Tensor] = {}

    def hook(name: str, change: Change):
        def record(m: nn.Module, args: tuple, y: Tensor) -> None:
            outs[name] = y
            with torch.no_grad():
                changes[name] = change(m, tuple(a.detach() for a in args), y.detach())

        return record

    hooks = [m.register_forward_hook(hook(n, c)) for n, (m, c) in sites.items()]
    try:
        for xb in x.split(settings.batch):
            outs.clear()
            changes.clear()
            with torch.enable_grad():
                z = model(xb.detach().requires_grad_(True)).float()
            names = [n for n in outs if outs[n].requires_grad]
            if not names:
                continue
            p = z.detach().softmax(1)
            for d in range(settings.draws):
                r = torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1
                v = p.sqrt() * r
                v = v - p * v.sum(1, keepdim=True)  # F^½ r: E[vvᵀ] = diag(p) − ppᵀ
                grads = torch.autograd.grad(
                    (v * z).sum(),
                    [outs[n] for n in names],
                    retain_graph=d < settings.draws - 1,
                    allow_unused=True,
                )
                for n, g in zip(names, grads, strict=True):
                    if g is None:  # the site does not reach the logits
                        continue
                    proj = (g * changes[n]).flatten(1).sum(1)  # vᵀ J Δy per image
                    sums[n] += float(proj.pow(2).sum()) / settings.draws
    finally:
        for h in hooks:
            h.remove()
        outs.clear()
        changes.clear()
    return {n: 0.5 * s / x.shape[0] for n, s in sums.items()}
