"""Image folders, class lists and data-set folders as PyTorch data sets."""

from qcli.data.images import (
    ImageFolderSet,
    ImageTransform,
    UnreadableImage,
    read_class_list,
    select_indices,
)
from qcli.data.sets import TensorSet, iterate, open_data

__all__ = [
    "ImageFolderSet",
    "ImageTransform",
    "TensorSet",
    "UnreadableImage",
    "iterate",
    "open_data",
    "read_class_list",
    "select_indices",
]
