"""The oscillation plot of two calibrations made with the CLI: a base method's per-unit loss
along depth beside MRECG's (and the base pass MRECG ranked its gaps by).

    python benchmarks/oscillation_plot.py base.qcli mrecg.qcli out.png "r20 W2A4" \\
        "QDrop + BN tuning" "MRECG+QDrop + BN tuning"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suites.ptq import pair_report

from qcli.artifacts.plot import write_loss_plot


def oscillation(qmodel: str) -> dict:
    manifest = json.loads((Path(qmodel) / "manifest.json").read_text())
    return manifest["metrics"]["reconstruction"]["oscillation"]


def main(base: str, merged: str, out: str, title: str, base_label: str, merged_label: str):
    report = pair_report(oscillation(base), oscillation(merged), base_label, merged_label)
    write_loss_plot(Path(out), report, title)
    for label, p in report["profiles"].items():
        print(label, p["oscillation"])


if __name__ == "__main__":
    main(*sys.argv[1:7])
