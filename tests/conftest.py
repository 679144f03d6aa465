"""Shared fixtures. `shared_data` finds ../shared/data (or $QCLI_SHARED_DATA) or skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_path() -> Path:
    return Path(os.environ.get("QCLI_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; its parent's `models/` holds the shared checkpoints."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set QCLI_SHARED_DATA to its location)")
    return path
