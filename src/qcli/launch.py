"""The `qcli` command: process-wide settings the application chooses, before torch loads.

OpenMP threads that spin while they wait make small tensor ops up to 20x slower as soon as
another process shares the cores (measured: MSE range search 6.4 s against 0.4 s on a busy
2-core machine), so the command asks for passive waits unless the user set OMP_WAIT_POLICY.
The library itself (`import qcli`) sets nothing: a program embedding it keeps its own choice.
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from qcli.cli import main as cli_main

    cli_main()
