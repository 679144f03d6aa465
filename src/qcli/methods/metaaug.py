"""MetaAug (Pham et al., ECCV'24): a learned augmentation against overfitting a small
calibration set, on top of reconstruction (AdaQuant, BRECQ, QDrop).

A small UNet T turns calibration images into transformed ones. Before each unit is
reconstructed, T is trained bi-level for `iters` steps: one differentiable inner step of the
unit's reconstruction on T(x) gives updated unit tensors θ' = θ − η·∇θ L_Q(θ; T(x)); the outer
loss then asks the quantized model with θ' to match the float model on the *original* images,
while T(x) keeps the float model's feature geometry (PKT) and stays away from x (margin):

    L_outer = a·KL(softmax(f_fp(x_v)/4) ‖ softmax(f_q(x_v; θ')/4))
            + b·relu(m − mean((T(x) − x)²)) + c·PKT(φ_fp(T(x)), φ_fp(x))

The unit is then reconstructed on the originals plus T's images; only T learns in the meta
phase (the real unit tensors are untouched). Choices where the paper's code is unspecified or
questionable (not fixed by the paper):

- T is sized for a CPU (widths 16-32-64, two poolings, GroupNorm instead of BatchNorm, so
  that T(x) of an image does not depend on its batch) and starts near the identity: output =
  x + residual, the residual's last conv drawn at a small scale (exactly zero would make the
  margin's gradient vanish at T(x) = x). Its output is clamped to the valid pixel range.
- The inner step is one SGD step per tensor normalized by the gradient's (detached) RMS, with
  the tensor's reconstruction learning rate: the size of Adam's first step, differentiable.
  It uses the plain reconstruction loss (no rounding regularizer, nothing dropped).
- f_q(x_v; θ') is the whole quantized model as it stands (tuned prefix, the unit with θ',
  range-quantized rest), as the official code does; x_v is an independent batch.
- No mixup: PKT compares T(x) and x image by image (the official code mixes the two batches
  with independent permutations, which compares unrelated images).
- The first unit (the stem) and the classifier's unit get no meta phase, as in the paper,
  but are still reconstructed on originals plus T's images.
- `iters` = 0 means no augmentation at all: the base method, bit for bit.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from qcli.errors import UsageError
from qcli.methods.chain import Chain, UnitData, run_batched
from qcli.methods.reconstruction import (
    ReconSettings,
    learnables,
    reconstruction_loss,
    unit_parts,
)
from qcli.methods.registry import setting
from qcli.quant.capture import QuantGraph
from qcli.quant.modules import QLinear
from qcli.quant.partition import Unit, prefix_unit, unit_module
from qcli.quant.quantizer import Quantizer, composed
from qcli.quant.rounding import rounding_restored


@dataclass(frozen=True)
class MetaAugSettings:
    iters: int = 50  # meta steps per unit; the paper runs 500 on a GPU
    # a (KL on originals), b (margin against the identity), c (PKT): the official run.sh
    weights: tuple[float, float, float] = (5.0, 0.5, 3e4)
    margin: float = 0.1  # m: the mean squared change T must at least make (normalized units)
    lr: float = 1e-3  # T's Adam; the paper's 5e-6 assumes a pre-warmed T and 500 steps/unit
    temperature: float = 4.0
    clip: float = 0.1  # T's gradient-norm clip, as the official code
    widths: tuple[int, ...] = (16, 32, 64)
    init_scale: float = 1e-3  # std of the residual's last conv at the start
    seed: int = 0


@dataclass(frozen=True)
class MetaAugFlags:
    """MetaAug's flags, as a reconstruction method registers them (None: not given);
    `meta_settings` turns them into `MetaAugSettings`."""

    metaaug: bool = setting(
        "--metaaug",
        "MetaAug (adaquant, brecq, qdrop): before each unit, train a small UNet T so that "
        "reconstructing on T(x) helps on the original images; then reconstruct on both.",
        default=False,
        kind=bool,
    )
    meta_iters: int | None = setting(
        "--meta-iters",
        "MetaAug: bi-level steps on T per unit [50; 0: no augmentation, the base method].",
        kind=int,
        low=0,
    )
    meta_weights: str | None = setting(
        "--meta-weights",
        "MetaAug: outer-loss weights a,b,c of KL on originals, the anti-identity margin and "
        "PKT feature preservation [5,0.5,30000].",
    )
    meta_margin: float | None = setting(
        "--meta-margin", "MetaAug: margin m, mean((T(x)-x)^2) [0.1].", kind=float
    )
    meta_lr: float | None = setting(
        "--meta-lr", "MetaAug: Adam learning rate of T [0.001].", kind=float
    )


def meta_settings(settings: dict[str, Any]) -> MetaAugSettings | None:
    """MetaAug's settings from the calibration settings (None: not asked for). A meta setting
    without `metaaug` is a usage error."""
    names = sorted(f.name for f in fields(MetaAugFlags) if f.name != "metaaug")
    given = {k: settings[k] for k in names if settings.get(k) is not None}
    if not settings.get("metaaug"):
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UsageError(f"{flag} needs --metaaug")
        return None
    m = MetaAugSettings(seed=int(settings.get("seed", 0)))
    if "meta_iters" in given:
        m = _replace(m, iters=int(given["meta_iters"]))
    if "meta_weights" in given:
        m = _replace(m, weights=parse_weights(given["meta_weights"]))
    if "meta_margin" in given:
        m = _replace(m, margin=float(given["meta_margin"]))
    if "meta_lr" in given:
        m = _replace(m, lr=float(given["meta_lr"]))
    if m.iters < 0:
        raise UsageError(f"--meta-iters must be at least 0, got {m.iters}")
    if m.margin < 0:
        raise UsageError(f"--meta-margin must be >= 0, got {m.margin}")
    if not m.lr > 0:
        raise UsageError(f"--meta-lr must be positive, got {m.lr}")
    return m


def _replace(m: MetaAugSettings, **kw: Any) -> MetaAugSettings:
    return MetaAugSettings(**{**asdict(m), **kw})


def parse_weights(value: str | Sequence[float]) -> tuple[float, float, float]:
    """'a,b,c' (or three numbers) -> the outer loss weights, each >= 0."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        weights = ()
    if len(weights) != 3 or min(weights) < 0:
        raise UsageError(f"--meta-weights must be three numbers >= 0 as a,b,c, got {value!r}")
    return weights  # type: ignore[return-value]


# ------------------------------------------------------------------------ the network T


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class _DoubleConv(nn.Sequential):
    """(conv3x3 - GroupNorm - ReLU) x 2, the UNet's building block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(_groups(cout), cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.GroupNorm(_groups(cout), cout),
            nn.ReLU(),
        )


class TransformNet(nn.Module):
    """A UNet on normalized images: x + residual(x), clamped to [lo, hi] per channel."""

    def __init__(self, bounds: tuple[Tensor, Tensor], widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        channels = bounds[0].shape[1]
        w = list(widths)
        self.down = nn.ModuleList(
            [_DoubleConv(channels, w[0])]
            + [
                nn.Sequential(nn.MaxPool2d(2), _DoubleConv(w[i - 1], w[i]))
                for i in range(1, len(w))
            ]
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(len(w) - 1)
        )
        self.fuse = nn.ModuleList(_DoubleConv(2 * w[i], w[i]) for i in range(len(w) - 1))
        self.out = nn.Conv2d(w[0], channels, 1)
        self.register_buffer("lo", bounds[0].clone())
        self.register_buffer("hi", bounds[1].clone())

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        h = x
        for down in self.down:
            h = down(h)
            skips.append(h)
        h = skips.pop()
        for i in reversed(range(len(self.up))):
            skip = skips.pop()
            h = self.up[i](h)  # odd sizes: pad up to the skip's
            h = F.pad(h, [0, skip.shape[-1] - h.shape[-1], 0, skip.shape[-2] - h.shape[-2]])
            h = self.fuse[i](torch.cat([skip, h], 1))
        y = x + self.out(h)
        return torch.maximum(torch.minimum(y, self.hi), self.lo)


def transform_net(bounds: tuple[Tensor, Tensor], m: MetaAugSettings) -> TransformNet:
    """T with seeded weights (He-normal convs, zero biases), its residual started at
    `init_scale`: near the identity, not on it."""
    net = TransformNet(bounds, m.widths)
    g = torch.Generator().manual_seed(m.seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = mod.weight[0].numel()
                std = (2.0 / fan_in) ** 0.5 if mod is not net.out else m.init_scale
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                mod.bias.zero_()
    return net


def pixel_range(norm: dict[str, Sequence[float]]) -> tuple[Tensor, Tensor]:
    """Normalized images of pixel values 0 and 1 per channel, [1, C, 1, 1] (as DGH clamps)."""
    mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


# ------------------------------------------------------------------------ the outer loss


def source(
    qg: QuantGraph,
    images: Tensor,
    s: ReconSettings,
    m: MetaAugSettings,
    input_norm: dict[str, Sequence[float]] | None,
    progress: Callable[..., None] | None = None,
) -> MetaAug:
    """MetaAug as the engine's `Seams.inputs`: T's output stays within the valid pixels of
    `input_norm` (mean, std), or without one (library use) the calibration images' range."""
    if input_norm is not None:
        bounds = pixel_range(input_norm)
    else:
        bounds = (images.amin((0, 2, 3), keepdim=True), images.amax((0, 2, 3), keepdim=True))
    return MetaAug(qg, images, s, m, bounds, progress)


def kl_term(fp_logits: Tensor, q_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """KL(softmax(fp/T) ‖ softmax(q/T)), averaged over the batch (no T² factor, as the code)."""
    target = F.softmax(fp_logits / temperature, dim=1)
    return F.kl_div(F.log_softmax(q_logits / temperature, dim=1), target, reduction="batchmean")


def margin_term(tx: Tensor, x: Tensor, margin: float) -> Tensor:
    """relu(m − mean((T(x) − x)²)): zero once T changes the images by at least m."""
    return F.relu(margin - (tx - x).pow(2).mean())


def pkt_term(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: the batch's cosine similarities, mapped to [0, 1] and
    row-normalized into distributions, compared by KL(teacher ‖ student), averaged over the
    B² entries (Passalis & Tefas, as the official code)."""

    def probs(f: Tensor) -> Tensor:
        f = f.flatten(1)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        sim = (f @ f.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    p_s, p_t = probs(student), probs(teacher)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ------------------------------------------------------------------------ the meta phase


@dataclass
class MetaUnit:
    """What the meta phase did for one unit (terms at the last step)."""

    name: str
    steps: int
    seconds: float
    outer_first: float = 0.0
    outer_last: float = 0.0
    kl: float = 0.0
    margin: float = 0.0
    pkt: float = 0.0
    change: float = 0.0  # mean((T(x) − x)²) on the last batch
    peak_rss_mb: float = 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _classifier(qg: QuantGraph) -> str | None:
    """The last linear layer's path: the classifier (φ is its input)."""
    names = [n for n, m in qg.module.named_modules() if isinstance(m, QLinear | nn.Linear)]
    return names[-1] if names else None


def _compose(mods: list[nn.Module]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for m in mods:
            x = m(x)
        return x

    return run


def _to_unit(qg: QuantGraph, chain: Chain, seg: Unit, unit: Unit) -> Callable[[Tensor], Tensor]:
    """Images -> the unit's input in `qg`, with autograd (Chain's walk is no_grad)."""
    mods = [unit_module(qg, s) for s in chain.passed]
    prefix = prefix_unit(qg, seg, unit.input)
    if prefix is not None:
        mods.append(unit_module(qg, prefix))
    return _compose(mods)


@dataclass
class MetaAug:
    """The run's T and its optimizer, the float targets of the original images, and the
    `Seams.inputs` source that trains T for a unit and returns originals + T's images."""

    qg: QuantGraph
    images: Tensor
    s: ReconSettings
    m: MetaAugSettings
    bounds: tuple[Tensor, Tensor]
    progress: Callable[..., None] | None = None
    units: list[MetaUnit] = field(default_factory=list)
    calls: int = 0

    def __post_init__(self) -> None:
        self.device = next(self.qg.module.parameters()).device
        self.net = transform_net(self.bounds, self.m).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.m.lr)
        self.generator = torch.Generator().manual_seed(self.m.seed + 1029)  # T's batches only
        self.classifier = _classifier(self.qg)
        self.rss_before = _peak_rss_mb()
        self.fp_logits: Tensor | None = None
        self.fp_feats: Tensor | None = None

    # -- the source -------------------------------------------------------------------
    def __call__(self, chain: Chain, seg: Unit, unit: Unit) -> UnitData:
        first = self.calls == 0
        self.calls += 1
        data = chain.unit_data(seg, unit)
        if self.m.iters == 0:
            return data
        if not first and self.classifier not in unit.layers:
            self.train(chain, seg, unit)
        other = chain.replay(self.transform(self.images)).unit_data(seg, unit)
        pairs = zip(_fields(data), _fields(other), strict=True)
        return UnitData(*(torch.cat([a, b]) for a, b in pairs))

    @torch.no_grad()
    def transform(self, images: Tensor) -> Tensor:
        return run_batched(self.net, images, self.s.batch_size, self.device, torch.float32)

    # -- float targets ----------------------------------------------------------------
    def _features(self, fp: QuantGraph) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """x -> (float logits, φ: the classifier's input), with autograd."""
        seen: list[Tensor] = []
        head = dict(fp.module.named_modules()).get(self.classifier or "")

        def run(x: Tensor) -> tuple[Tensor, Tensor]:
            seen.clear()
            if head is None:
                out = fp.module(x)
                return out, out
            hook = head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
            try:
                out = fp.module(x)
            finally:
                hook.remove()
            return out, seen[0].flatten(1)

        return run

    def _targets(self, fp: QuantGraph) -> None:
        feats = self._features(fp)
        logits, phis = [], []
        with torch.no_grad():
            for x in self.images.split(self.s.batch_size):
                out, phi = feats(x.to(self.device, torch.float32))
                logits.append(out.cpu())
                phis.append(phi.cpu())
        self.fp_logits, self.fp_feats = torch.cat(logits), torch.cat(phis)

    # -- the bi-level step ------------------------------------------------------------
    def train(self, chain: Chain, seg: Unit, unit: Unit) -> MetaUnit:
        """Train T for `iters` steps on this unit; the unit's tensors are restored."""
        if self.progress:
            self.progress(0, label=f"MetaAug: T for {unit.name}")
        if self.fp_logits is None:
            self._targets(chain.fp)
        start = time.perf_counter()
        module = unit_module(self.qg, unit)
        layers, acts = unit_parts(module)
        weight_qs = [m.weight_quantizer for m in layers if m.weight_quantizer is not None]
        # The meta phase reads the unit's learnable tensors; the learned rounding `learnables`
        # attaches for that comes off again (the reconstruction attaches its own).
        with rounding_restored(weight_qs):
            groups, _ = learnables(layers, acts, self.s)
            report = self._meta_phase(chain, seg, unit, module, groups)
        report.seconds = round(time.perf_counter() - start, 3)
        report.peak_rss_mb = round(_peak_rss_mb(), 1)
        self.units.append(report)
        return report

    def _meta_phase(
        self, chain: Chain, seg: Unit, unit: Unit, module: nn.Module, groups: list[dict[str, Any]]
    ) -> MetaUnit:
        """`iters` outer steps on T through the unit's learnable tensors (`groups`)."""
        names = {id(p): n for n, p in module.named_parameters()}
        params = {names[id(p)]: p for g in groups for p in g["params"]}
        eta = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
        steps = self.m.iters if params else 0  # a unit with nothing to learn: nothing to meta
        report = MetaUnit(unit.name, steps, 0.0)
        step = _MetaStep(self, chain, seg, unit, module, params, eta)
        try:
            for p in params.values():
                p.requires_grad_(True)
            with composed(m for m in self.qg.module.modules() if isinstance(m, Quantizer)):
                for i in range(steps):
                    terms = step()
                    report.outer_first = terms["outer"] if i == 0 else report.outer_first
                    report.outer_last = terms["outer"]
                    for k in ("kl", "margin", "pkt", "change"):
                        setattr(report, k, terms[k])
        finally:
            for p in params.values():
                p.requires_grad_(False)
        return report

    def report(self) -> dict[str, Any]:
        """For the manifest: settings, per-unit meta phase, its time and the memory peak."""
        rows = [asdict(u) for u in self.units]
        cuda = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None
        return {
            "settings": asdict(self.m),
            "mixup": "none",
            "units": rows,
            "seconds": round(sum(u.seconds for u in self.units), 2),
            "peak_rss_mb_before": round(self.rss_before, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_cuda_mb": round(cuda, 1) if cuda is not None else None,
        }


def _fields(d: UnitData) -> tuple[Tensor, Tensor, Tensor]:
    return d.xq, d.xf, d.y


class _MetaStep:
    """One outer step on T through one differentiable inner step of the unit."""

    def __init__(self, meta: MetaAug, chain, seg, unit, module, params, eta) -> None:
        self.meta, self.module, self.params, self.eta = meta, module, params, eta
        self.to_q = _to_unit(meta.qg, chain, seg, unit)
        self.to_f = _to_unit(chain.fp, chain, seg, unit)
        self.target = unit_module(chain.fp, unit)
        self.features = meta._features(chain.fp)

    def inner(self, tx: Tensor) -> dict[str, Tensor]:
        """θ' = θ − η·g/rms(g), g = ∇θ L_Q(θ; T(x)), kept differentiable in T."""
        xf = self.to_f(tx)
        pred = functional_call(self.module, self.params, (self.to_q(tx),))
        loss = reconstruction_loss(pred, self.target(xf))
        ps = list(self.params.values())
        grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        new = {}
        for (name, p), g in zip(self.params.items(), grads, strict=True):
            if g is None:
                new[name] = p
                continue
            rms = g.detach().pow(2).mean().sqrt().clamp(min=1e-12)
            new[name] = p - self.eta[name] * g / rms
        return new

    def __call__(self) -> dict[str, float]:
        meta, m = self.meta, self.meta.m
        n, bs = meta.images.shape[0], min(meta.s.batch_size, meta.images.shape[0])
        idx = torch.randint(n, (bs,), generator=meta.generator)
        vidx = torch.randint(n, (bs,), generator=meta.generator)
        x = meta.images[idx].to(meta.device, torch.float32)
        xv = meta.images[vidx].to(meta.device, torch.float32)
        assert meta.fp_logits is not None and meta.fp_feats is not None
        tx = meta.net(x)
        new = self.inner(tx)
        q_logits = functional_call(meta.qg.module, new, (xv,))
        kl = kl_term(meta.fp_logits[vidx].to(meta.device), q_logits, m.temperature)
        margin = margin_term(tx, x, m.margin)
        pkt = pkt_term(self.features(tx)[1], meta.fp_feats[idx].to(meta.device))
        a, b, c = m.weights
        outer = a * kl + b * margin + c * pkt
        net_params = list(meta.net.parameters())
        grads = torch.autograd.grad(outer, net_params, allow_unused=True)
        for p, g in zip(net_params, grads, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(net_params, m.clip)
        meta.opt.step()
        meta.opt.zero_grad(set_to_none=True)
        change = (tx - x).pow(2).mean()
        terms = {"outer": outer, "kl": kl, "margin": margin, "pkt": pkt, "change": change}
        return {k: float(v.detach()) for k, v in terms.items()}
