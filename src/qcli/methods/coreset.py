"""ACS (Huang et al., arXiv 2306.07215): which training images QAT spends the next epochs on.

Every R epochs each training image gets two scores from the current quantized model's softmax
p_q (eval mode, deterministic eval transform, no augmentation):
- EVS, the error vector score ‖p_q − onehot(y)‖₂: how wrong the quantized model still is;
- DS, the disagreement score ‖p_q − p_fp‖₂: how far it is from the float model of the same
  architecture.
They are combined as β(t)·EVS + (1 − β(t))·DS and the top share of every class is kept.

β(t) is the released code's schedule ½(1 + cos(πt/E)) (`adaptive='cosine'`), not the paper's
cos(πt/2E): both fall from 1 to 0, the code's is the one the published numbers were measured
with, and it hands over to DS sooner (β = 0.5 at mid-training rather than 0.71), which suits
KD-only training whose target is p_fp.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

CORESETS = ("acs", "random", "full")


def evs(probs: Tensor, labels: Tensor) -> Tensor:
    """Error vector score per image: ‖p_q − onehot(y)‖₂."""
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return torch.linalg.vector_norm(probs - onehot, dim=1)


def ds(probs: Tensor, fp_probs: Tensor) -> Tensor:
    """Disagreement score per image: ‖p_q − p_fp‖₂."""
    return torch.linalg.vector_norm(probs - fp_probs, dim=1)


def beta(epoch: int, epochs: int) -> float:
    """The EVS weight at `epoch` of `epochs`: ½(1 + cos(π·t/E)), 1 at the start."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def acs_scores(probs: Tensor, fp_probs: Tensor, labels: Tensor, epoch: int, epochs: int) -> Tensor:
    b = beta(epoch, epochs)
    return b * evs(probs, labels) + (1.0 - b) * ds(probs, fp_probs)


def class_sizes(labels: Tensor, fraction: float) -> dict[int, int]:
    """round(F·n_c) images per class, at least one for every class present."""
    counts = torch.bincount(labels)
    return {c: max(1, round(fraction * int(n))) for c, n in enumerate(counts.tolist()) if n}


def select_top(scores: Tensor, labels: Tensor, fraction: float) -> Tensor:
    """Sorted indices of the highest-scoring round(F·n_c) images of every class c.

    Ties go to the lower index (a stable sort), so every process picks the same set."""
    chosen = []
    for c, k in class_sizes(labels, fraction).items():
        members = torch.nonzero(labels == c).flatten()
        order = torch.sort(scores[members], descending=True, stable=True).indices
        chosen.append(members[order[:k]])
    return torch.sort(torch.cat(chosen)).values


def select_random(labels: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """A fresh random subset with the per-class sizes `select_top` keeps."""
    chosen = []
    for c, k in class_sizes(labels, fraction).items():
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.sort(torch.cat(chosen)).values


def fingerprint(indices: Tensor) -> str:
    """A short hash of a coreset: what processes compare to show they train on one set."""
    data = indices.to(torch.int64).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
