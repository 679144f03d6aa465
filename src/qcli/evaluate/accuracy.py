"""Top-1/top-5 accuracy and agreement with a reference model, for torch and onnxruntime alike.

Anything that maps a float NCHW tensor to logits can be evaluated (an `nn.Module`, an
`OrtModel`, a lambda), so the same numbers come out for the simulation and the deployed file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Logits = Callable[[torch.Tensor], Any]
Batches = Iterable[tuple[torch.Tensor, Any]]


@dataclass
class Accuracy:
    """Accuracy on the labeled images and agreement with a reference on all images.

    `top1`/`top5` are percentages over the `n` labeled images (None when there were none);
    `agreement_with_reference` is the percentage of all `n_images` whose top-1 class equals the
    reference's. `predictions` (top-1 class per image, in order) lets callers compare two runs.
    """

    top1: float | None
    top5: float | None
    n: int
    agreement_with_reference: float | None = None
    disagreements: int | None = None
    n_images: int = 0
    predictions: torch.Tensor = field(
        default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False
    )
    reference_predictions: torch.Tensor | None = field(default=None, repr=False)
    classes: int = 0  # the model's output width
    max_label: int = -1  # the largest label seen (-1: unlabelled)
    nonfinite_images: int = 0  # images whose logits hold NaN/Inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; the per-image predictions stay out of it."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "n": self.n,
            "n_images": self.n_images,
            "agreement_with_reference": self.agreement_with_reference,
            "disagreements": self.disagreements,
        }


def _logits(fn: Logits, x: torch.Tensor) -> torch.Tensor:
    """Call `fn` and bring its output to a 2-D float CPU tensor (N, classes)."""
    out = fn(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(np.asarray(out))
    out = out.detach().float().cpu()
    return out.reshape(out.shape[0], -1)


def _top5_hits(logits: torch.Tensor, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether each label is among the top min(5, classes) classes (the top-1 always counts)."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return (topk == y[:, None]).any(dim=1) | (pred == y)


def _percent(count: int, total: int) -> float | None:
    return 100.0 * count / total if total else None


def accuracy(
    fn: Logits,
    batches: Batches,
    reference_fn: Logits | None = None,
    progress: Callable[[int], None] | None = None,
) -> Accuracy:
    """Evaluate `fn` over `(x, y)` batches; labels < 0 mark unlabeled images.

    Unlabeled images count toward agreement with `reference_fn` but not toward top-1/top-5,
    so generated or unlabeled folders can still compare a quantized model against its
    full-precision one. `progress(n)` is called after every batch with its size.
    """
    preds: list[torch.Tensor] = []
    ref_preds: list[torch.Tensor] = []
    top1 = top5 = labeled = done = nonfinite = 0
    classes, max_label = 0, -1
    with torch.no_grad():
        for x, y in batches:
            logits = _logits(fn, x)
            labels = torch.as_tensor(y, dtype=torch.long).reshape(-1)
            classes = logits.shape[1]
            max_label = max(max_label, int(labels.max()) if labels.numel() else -1)
            nonfinite += int((~torch.isfinite(logits)).any(dim=1).sum())
            pred = logits.argmax(dim=1)
            mask = labels >= 0
            top1 += int((pred[mask] == labels[mask]).sum())
            top5 += int(_top5_hits(logits[mask], pred[mask], labels[mask]).sum())
            labeled += int(mask.sum())
            preds.append(pred)
            if reference_fn is not None:
                ref_preds.append(_logits(reference_fn, x).argmax(dim=1))
            done += len(pred)
            if progress is not None:
                progress(len(pred))
    result = _summarize(preds, ref_preds, top1, top5, labeled, done, reference_fn is not None)
    result.classes, result.max_label, result.nonfinite_images = classes, max_label, nonfinite
    return result


def _summarize(
    preds: list[torch.Tensor],
    ref_preds: list[torch.Tensor],
    top1: int,
    top5: int,
    labeled: int,
    done: int,
    with_reference: bool,
) -> Accuracy:
    all_preds = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    result = Accuracy(
        top1=_percent(top1, labeled),
        top5=_percent(top5, labeled),
        n=labeled,
        n_images=done,
        predictions=all_preds,
    )
    if with_reference:
        ref = torch.cat(ref_preds) if ref_preds else torch.empty(0, dtype=torch.long)
        result.reference_predictions = ref
        result.disagreements = int((all_preds != ref).sum())
        result.agreement_with_reference = _percent(done - result.disagreements, done)
    return result
