"""On-disk formats: atomic writes, the data-set folder, the .qcli folder, checksums."""

from qcli.artifacts.atomic import atomic_dir, atomic_file, prepare_output, sha256_file
from qcli.artifacts.dataset import StoredDataset, read_dataset, write_dataset
from qcli.artifacts.qmodel import read_qmodel, write_qmodel

__all__ = [
    "StoredDataset",
    "atomic_dir",
    "atomic_file",
    "prepare_output",
    "read_dataset",
    "read_qmodel",
    "sha256_file",
    "write_dataset",
    "write_qmodel",
]
