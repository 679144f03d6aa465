"""Quantization-aware training: LSQ step sizes, straight-through rounding, KD from the float
model, on the full training set or on a coreset (ACS or random) re-chosen every R epochs.

What is trained is the captured graph itself: conv/linear weights and biases and every
quantizer's step size (`QuantMode.LEARN`: LSQ's gradient scale on the fused fake-quantizer's
step-size gradient). Zero points stay where calibration put them (integers), specs stay as
captured (bits, the int8 'safe' limit), so the result is on exactly the grid export writes.

BatchNorm: capture folds every BN into the conv before it, with its running statistics, so
QAT trains the folded weights with the statistics frozen from the first step (the "fold,
freeze" scheme from epoch 0): no BN remains to re-estimate, train and eval mode compute the
same function, and the trained graph exports exactly like a calibrated one.

Randomness (shuffling, augmentation, random coresets) comes from one seeded generator whose
state is checkpointed with the model, optimizer and schedule, so a resumed run is the same run.
Under torchrun every rank draws the same numbers for the whole global batch and trains on its
slice of it, so the draws do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcli.distributed import Comm
from qcli.errors import UsageError
from qcli.methods import coreset as C
from qcli.quant.capture import QuantGraph
from qcli.quant.quantizer import QuantMode, quant_mode, replicated

OPTIMIZERS = ("sgd", "adam")
# With BN folded there is no normalization to absorb large steps: on ResNet-20 W4A4 (2,048
# CIFAR-10 images, 2 epochs, KD) SGD at 0.001 took 61.6% to 76.4% and Adam at 1e-4 to 76.6%,
# while SGD at 0.003 and 0.01 diverged to chance.
DEFAULT_LR = {"sgd": 1e-3, "adam": 1e-4}
AUGMENTS = ("auto", "crop-flip", "resized-crop-flip", "none")


@dataclass(frozen=True)
class QATSettings:
    epochs: int = 10
    coreset: str = "acs"  # acs | random | full
    fraction: float = 0.1  # share of every class in the coreset
    interval: int = 10  # R: epochs between coreset selections (the paper's default)
    kd: bool = True  # soft cross-entropy to the float model at T=1 (ACS's loss); else CE
    optimizer: str = "sgd"
    lr: float = DEFAULT_LR["sgd"]
    momentum: float = 0.9  # SGD, Nesterov
    weight_decay: float = 5e-4  # on weights only (not biases or step sizes)
    batch_size: int = 128  # global: split over torchrun processes
    augment: str = "auto"  # the stage picks it from the input size (`augmentation_for`)
    amp: bool = True  # bfloat16 autocast on CUDA (quantizers stay float32); ignored on CPU
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.coreset not in C.CORESETS:
            raise UsageError(f"--coreset must be one of {', '.join(C.CORESETS)}")
        if not 0 < self.fraction <= 1:
            raise UsageError(f"--fraction must be within (0, 1], got {self.fraction}")
        if self.interval < 1:
            raise UsageError(f"--interval must be at least 1, got {self.interval}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"unknown augmentation {self.augment!r}")


def augmentation_for(size: tuple[int, int]) -> str:
    """CIFAR-sized inputs get a padded random crop, ImageNet-sized ones RandomResizedCrop."""
    return "crop-flip" if max(size) <= 64 else "resized-crop-flip"


@dataclass(frozen=True)
class TrainImages:
    """Decoded training images at the model's size, uint8, with their labels (-1: none)."""

    pixels: Tensor  # [N, 3, H, W] uint8
    labels: Tensor  # [N] int64
    normalize: Callable[[Tensor], Tensor]  # uint8 -> the model's float input

    def __len__(self) -> int:
        return self.pixels.shape[0]


# ----------------------------------------------------------------------------- augmentation


def draw_augmentation(kind: str, n: int, size: tuple[int, int], gen: torch.Generator) -> Tensor:
    """Per-image parameters [n, 6] (top, left, height, width, flip, unused), drawn for a
    whole global batch so every process draws the same numbers."""
    h, w = size
    out = torch.zeros((n, 6), dtype=torch.int64)
    if kind == "none":
        out[:, 2], out[:, 3] = h, w
        return out
    if kind == "crop-flip":  # pad 4, crop back to size
        out[:, 0:2] = torch.randint(0, 9, (n, 2), generator=gen)
        out[:, 2], out[:, 3] = h, w
    else:  # RandomResizedCrop: area 8-100%, aspect 3/4-4/3 (log-uniform)
        area = torch.empty(n).uniform_(0.08, 1.0, generator=gen) * h * w
        ratio = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
        ch = torch.sqrt(area / ratio).round().clamp(1, h).long()
        cw = torch.sqrt(area * ratio).round().clamp(1, w).long()
        u = torch.rand((n, 2), generator=gen)
        out[:, 0] = (u[:, 0] * (h - ch + 1)).long()
        out[:, 1] = (u[:, 1] * (w - cw + 1)).long()
        out[:, 2], out[:, 3] = ch, cw
    out[:, 4] = torch.randint(0, 2, (n,), generator=gen)
    return out


def augment(pixels: Tensor, params: Tensor, kind: str) -> Tensor:
    """uint8 [B, 3, H, W] -> augmented uint8 of the same shape."""
    if kind == "none":
        return pixels
    b, _, h, w = pixels.shape
    if kind == "crop-flip":
        padded = F.pad(pixels, (4, 4, 4, 4))
        rows = params[:, 0:1] + torch.arange(h)
        cols = params[:, 1:2] + torch.arange(w)
        x = padded[
            torch.arange(b)[:, None, None, None],
            torch.arange(3)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    else:
        from torchvision.transforms.v2 import functional as TF

        x = torch.stack(
            [
                TF.resized_crop(img, *map(int, p[:4]), [h, w], antialias=True)
                for img, p in zip(pixels, params, strict=True)
            ]
        )
    flip = params[:, 4].bool()[:, None, None, None]
    return torch.where(flip, x.flip(3), x)


# ------------------------------------------------------------------------------ losses


def kd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Soft cross-entropy −Σ softmax(z_T)·log softmax(z_S) at T=1, no label term (ACS)."""
    return -(F.softmax(teacher.float(), 1) * F.log_softmax(student.float(), 1)).sum(1).mean()


# ------------------------------------------------------------------------------ trainer


@dataclass
class EpochStats:
    epoch: int
    loss: float
    coreset: int  # images trained on this epoch
    selected: bool  # a new coreset was chosen before it
    beta: float | None  # ACS's EVS weight at that selection
    train_s: float
    score_s: float
    lr: float
    fingerprints: list[str] = field(default_factory=list)  # coreset hash per rank


class Trainer:
    """One QAT run; `state_dict`/`load_state_dict` carry everything a resume needs."""

    def __init__(
        self,
        qg: QuantGraph,
        teacher: nn.Module,
        data: TrainImages,
        s: QATSettings,
        comm: Comm,
    ) -> None:
        self.qg, self.teacher, self.data, self.s, self.comm = qg, teacher, data, s, comm
        self.device = comm.device
        self.amp = s.amp and self.device.type == "cuda"
        qg.to(self.device)
        teacher.to(self.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        groups = _param_groups(qg, s.weight_decay)
        if s.optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=True)
        else:
            self.opt = torch.optim.Adam(groups, lr=s.lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=s.epochs)
        self.gen = torch.Generator().manual_seed(s.seed)
        self.epoch = 0
        self.coreset: Tensor | None = None
        self.history: list[EpochStats] = []
        self._fp_probs: Tensor | None = None
        self.model: nn.Module = qg.module
        if comm.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(qg.module, device_ids=ids)

    # -- checkpoint -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The un-wrapped model's tensors (so a resume may use another process count)."""
        return {
            "epoch": self.epoch,
            "model": {k: v.detach().cpu() for k, v in self.qg.module.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "generator": self.gen.get_state(),
            "coreset": self.coreset,
            "history": [asdict(h) for h in self.history],
            "settings": asdict(self.s),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.qg.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        self.coreset = state["coreset"]
        self.epoch = int(state["epoch"])
        self.history = [EpochStats(**h) for h in state["history"]]

    # -- the run ----------------------------------------------------------------------------

    def run(
        self,
        task: Callable[[str, int | None], contextlib.AbstractContextManager],
        after_epoch: Callable[[Trainer, EpochStats], None] | None = None,
    ) -> list[EpochStats]:
        """Train the remaining epochs; `task(label, total)` gives each epoch a progress bar
        (advance per step); `after_epoch` checkpoints and reports. The quantizers learn (LSQ)
        inside the run only, with the step-size gradient of the global batch."""
        learn = quant_mode(self.qg.select(), QuantMode.LEARN)
        with learn, replicated(self.qg.select(weights=False), self.comm.world):
            return self._epochs(task, after_epoch)

    def _epochs(
        self,
        task: Callable[[str, int | None], contextlib.AbstractContextManager],
        after_epoch: Callable[[Trainer, EpochStats], None] | None,
    ) -> list[EpochStats]:
        s = self.s
        while self.epoch < s.epochs:
            t = self.epoch
            selected, b, score_s = False, None, 0.0
            if s.coreset != "full" and (t % s.interval == 0 or self.coreset is None):
                start = time.perf_counter()
                with task(f"epoch {t + 1}/{s.epochs}: select coreset", None):
                    self.coreset, b = self.select(t)
                score_s = time.perf_counter() - start
                selected = True
            indices = self.coreset if self.coreset is not None else torch.arange(len(self.data))
            start = time.perf_counter()
            lr = self.opt.param_groups[0]["lr"]
            loss = self.train_epoch(indices, task, f"epoch {t + 1}/{s.epochs}")
            self.sched.step()
            prints = self.comm.gather_objects(C.fingerprint(indices)) if selected else []
            stats = EpochStats(
                t + 1,
                loss,
                len(indices),
                selected,
                b,
                round(time.perf_counter() - start, 3),
                round(score_s, 3),
                lr,
                [str(p) for p in prints],
            )
            self.history.append(stats)
            self.epoch = t + 1
            if after_epoch is not None:
                after_epoch(self, stats)
        return self.history

    def select(self, epoch: int) -> tuple[Tensor, float | None]:
        """The coreset for the next R epochs, identical on every rank."""
        labels = self.data.labels
        if self.s.coreset == "random":
            return C.select_random(labels, self.s.fraction, self.gen), None
        probs = self.probs(self.qg.module, quantized=True)  # not DDP: shards differ in size
        if self._fp_probs is None:  # the float model does not change: score it once
            self._fp_probs = self.probs(self.teacher, quantized=False)
        scores = C.acs_scores(probs, self._fp_probs, labels, epoch, self.s.epochs)
        return C.select_top(scores, labels, self.s.fraction), C.beta(epoch, self.s.epochs)

    @torch.no_grad()
    def probs(self, module: nn.Module, quantized: bool) -> Tensor:
        """Softmax of every training image (eval transform, eval mode), each rank scoring
        its shard and all ranks gathering the whole."""
        n = len(self.data)
        lo, hi = self.comm.shard(n)
        out = []
        was_training = module.training
        module.eval()
        mode = QuantMode.QUANTIZE if quantized else QuantMode.OFF
        with quant_mode(self.qg.select(), mode) if quantized else contextlib.nullcontext():
            for i in range(lo, hi, self.s.batch_size):
                x = self.data.normalize(self.data.pixels[i : min(i + self.s.batch_size, hi)])
                with self._autocast():
                    out.append(F.softmax(module(x.to(self.device)).float(), 1))
        module.train(was_training)
        local = torch.cat(out) if out else torch.zeros((0, self._classes()), device=self.device)
        return self.comm.gather(local, n).cpu()

    def _classes(self) -> int:
        x = self.data.normalize(self.data.pixels[:1]).to(self.device)
        with torch.no_grad():
            return int(self.teacher(x).shape[1])

    def train_epoch(self, indices: Tensor, task, label: str) -> float:
        s, comm = self.s, self.comm
        order = indices[torch.randperm(len(indices), generator=self.gen)]
        batches = list(order.split(s.batch_size))
        if len(batches) > 1 and len(batches[-1]) < comm.world:
            batches.pop()  # every process needs at least one image per step
        size = tuple(self.data.pixels.shape[2:])
        self.model.train()
        total, seen = 0.0, 0
        with task(label, len(batches)) as advance:
            for batch in batches:
                params = draw_augmentation(s.augment, len(batch), size, self.gen)
                lo, hi = comm.shard(len(batch))
                idx, params = batch[lo:hi], params[lo:hi]
                x = augment(self.data.pixels[idx], params, s.augment)
                x = self.data.normalize(x).to(self.device, non_blocking=True)
                with self._autocast():
                    out = self.model(x)
                    if s.kd:
                        with torch.no_grad():
                            target = self.teacher(x)
                        loss = kd_loss(out, target)
                    else:
                        loss = F.cross_entropy(out.float(), self.data.labels[idx].to(self.device))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                keep_scales_positive(self.qg)
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
                advance(1)
        return comm.mean(total / max(seen, 1))

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _param_groups(qg: QuantGraph, weight_decay: float) -> list[dict[str, Any]]:
    """Weights with decay; biases and step sizes without (decay would pull a step size to
    zero, and biases have no reason to shrink)."""
    scales = {id(q.scale) for q in qg.select()}
    weights, others = [], []
    for name, p in qg.module.named_parameters():
        p.requires_grad_(True)
        if id(p) not in scales and name.endswith("weight"):
            weights.append(p)
        else:
            others.append(p)
    return [
        {"params": weights, "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]


@torch.no_grad()
def keep_scales_positive(qg: QuantGraph) -> None:
    for q in qg.select():
        q.scale.clamp_(min=1e-8)


def freeze(qg: QuantGraph) -> None:
    """Back to a calibrated graph's state: nothing requires gradients."""
    for p in qg.module.parameters():
        p.requires_grad_(False)
