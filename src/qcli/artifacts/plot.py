"""A PNG of per-unit reconstruction losses along depth: where the oscillation MRECG removes
shows (one line per profile, log scale, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qcli.artifacts.atomic import atomic_file


def write_loss_plot(path: Path, report: dict[str, Any], title: str) -> Path:
    """`report`: the reconstruction's `oscillation` entry ({"axis": block names,
    "profiles": {label: {"depth", "loss", "oscillation"}}})."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    axis = report["axis"]
    fig = Figure(figsize=(max(6.0, 0.45 * len(axis) + 2), 4.8))
    ax = fig.add_subplot()
    for label, p in report["profiles"].items():
        osc = p["oscillation"]
        ax.plot(
            p["depth"],
            [max(v, 1e-12) for v in p["loss"]],
            marker="o",
            linestyle="--" if "before" in label else "-",
            label=f"{label}: {osc['decreases']} drops, oscillation {osc['relative']:.3f}",
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(axis)))
    ax.set_xticklabels(axis, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("reconstruction loss at the unit output")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
