"""Latency per batch size and on-disk size, for torch models and onnxruntime sessions alike.

Shared machines are noisy, so latency reports the median of repeated runs after warm-up, and
each batch size gets a time budget so a slow model cannot make `eval` run for minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcli.errors import QcliError

MIN_REPEATS = 3


@dataclass(frozen=True)
class LatencyStats:
    """Seconds per call of one batch; `per_image` is the median divided by the batch size."""

    batch_size: int
    median: float
    p90: float
    mean: float
    min: float
    repeats: int

    @property
    def per_image(self) -> float:
        return self.median / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_image": self.per_image}


def _time_calls(
    fn: Callable[[torch.Tensor], Any], x: torch.Tensor, repeats: int, budget_s: float
) -> list[float]:
    """Time calls until `repeats` are done, or the budget is spent after MIN_REPEATS."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(repeats, MIN_REPEATS):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        if len(times) >= MIN_REPEATS and time.perf_counter() - start >= budget_s:
            break
    return times


def _stats(batch_size: int, times: list[float]) -> LatencyStats:
    arr = np.asarray(times)
    return LatencyStats(
        batch_size=batch_size,
        median=float(np.median(arr)),
        p90=float(np.percentile(arr, 90)),
        mean=float(arr.mean()),
        min=float(arr.min()),
        repeats=len(times),
    )


def latency(
    fn: Callable[[torch.Tensor], Any],
    input_shape: tuple[int, int, int],
    batch_sizes: Iterable[int] = (1, 64),
    repeats: int = 50,
    warmup: int = 3,
    budget_s: float = 3.0,
    seed: int = 0,
) -> dict[int, LatencyStats]:
    """Time `fn` on random (N, C, H, W) inputs for each batch size N.

    Each batch size runs `warmup` untimed calls, then timed calls until `repeats` are done or
    `budget_s` seconds have passed (at least MIN_REPEATS either way).
    """
    gen = torch.Generator().manual_seed(seed)
    results: dict[int, LatencyStats] = {}
    with torch.no_grad():
        for n in batch_sizes:
            x = torch.randn((n, *input_shape), generator=gen)
            for _ in range(warmup):
                fn(x)
            results[n] = _stats(n, _time_calls(fn, x, repeats, budget_s))
    return results


def file_size(path: str | Path) -> int:
    """Bytes on disk: the file's size, or the sum over every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    raise QcliError(f"cannot measure the size of '{p}': it does not exist")
