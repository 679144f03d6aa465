"""Hand the heap's free pages back to the system, so resident memory follows what is held.

glibc raises its mmap threshold each time a large mapped block is freed; from then on blocks
of that size come from the heap, and a free page inside the heap stays resident until
`malloc_trim`. DGH's compact idle state cycles one batch's float32 images, their gradients
and the step's activations through the heap on every visit, so without a trim the pages
resident after many visits grow with the number of batches, not with what is held (ResNet-20,
batch 64, best of 3 runs: N = 2,048 kept 51.6 MiB more than N = 256 without the trim and 26.3
with it, against 24 MiB of images; benchmarks/dgh_memory.trim.md). Elsewhere (macOS, Windows,
musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except (OSError, TypeError):  # Windows has no process-wide handle
        return None
    return getattr(libc, "malloc_trim", None)


def release_free_heap() -> bool:
    """Return the free heap pages to the system; whether this C library can."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
