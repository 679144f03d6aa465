"""Shared fixtures. `shared_data` finds ../shared/data (or $QCLI_SHARED_DATA) or skips."""

from __future__ import annotations

import os

# What the `qcli` command chooses (qcli.launch) for the in-process CLI runs here: passive
# OpenMP waits, set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qcli.models import resnet20

REPO = Path(__file__).resolve().parents[1]


def shared_data_path() -> Path:
    return Path(os.environ.get("QCLI_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def one_thread():
    """Small forwards are fastest on one thread, and far slower when threads fight for cores.

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; its parent's `models/` holds the shared checkpoints."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set QCLI_SHARED_DATA to its location)")
    return path


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """A random but fixed ResNet-20 checkpoint (random is enough to test the plumbing)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "r20.pt"
    torch.save({"state_dict": resnet20().state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """Two classes of 8 random 32x32 images each."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(8):
            arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root
