"""Peak resident memory of this process, for the suites' memory columns (standard library
only, so a fresh worker process can import it without raising its own baseline)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def reset_peak_rss() -> None:
    """Start this process's peak-RSS count afresh (Linux clear_refs 5), so one cell's peak is
    its own and not the largest of every cell before it in the same process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float | None:
    """Peak RSS since the process began or the last reset (VmHWM), in MiB; None where /proc
    is not Linux's. Not ru_maxrss: Linux carries that across fork+exec and never resets it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None
