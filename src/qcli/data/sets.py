"""One way to open data (a data-set folder or an image folder) and one way to batch it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from qcli.artifacts.dataset import read_dataset
from qcli.data.images import ClassList, ImageFolderSet, UnreadableImage, select_indices
from qcli.errors import QcliError, UsageError
from qcli.models.input_spec import InputSpec


class TensorSet(Dataset):
    """Images already in memory (a data-set folder): `(image, label)` with label -1 if none."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
        if labels is None:
            labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{tuple(labels.shape)} labels for {images.shape[0]} images")
        self.images = images.float()
        self.labels = labels.long()
        self.manifest = dict(manifest or {})
        self.classes: list[str] = list(self.manifest.get("classes", []))
        self.skipped: list[tuple[str, str]] = []  # always empty: tensors cannot fail to decode

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Sequence[int]) -> TensorSet:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorSet(self.images[idx], self.labels[idx], self.manifest)


def open_data(
    path: str | Path,
    input_spec: InputSpec,
    *,
    class_list: ClassList | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A folder with `manifest.json` is a data-set folder (checked against the model's input
    size); any other folder is an image folder decoded with `input_spec`."""
    path = Path(path)
    if not path.exists():
        raise QcliError(f"data folder '{path}' does not exist")
    if not path.is_dir():
        raise QcliError(f"data '{path}' is not a folder (give an image folder or a data set)")
    if not (path / "manifest.json").exists():
        return ImageFolderSet(path, input_spec, class_list=class_list, limit=limit, seed=seed)
    stored = read_dataset(path)
    height, width = stored.images.shape[2:]
    if (height, width) != tuple(input_spec.size):
        h, w = input_spec.size
        raise QcliError(
            f"data set '{path}' holds {height}x{width} images but the model expects {h}x{w}"
        )
    dataset = TensorSet(stored.images, stored.labels, stored.manifest)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(select_indices(len(dataset), limit, seed))
    return dataset


def iterate(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches `(images [B,C,H,W], labels [B] int64)` in order.

    Images that fail to decode are left out (the data set records them in `.skipped`), so a
    batch can be shorter than `batch_size`; a batch with nothing left is not yielded.
    """
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if isinstance(dataset, TensorSet):
        for start in range(0, len(dataset), batch_size):
            stop = start + batch_size
            yield dataset.images[start:stop], dataset.labels[start:stop]
        return
    for start in range(0, len(dataset), batch_size):
        images, labels = [], []
        for index in range(start, min(start + batch_size, len(dataset))):
            try:
                image, label = dataset[index]
            except UnreadableImage:
                continue
            images.append(image)
            labels.append(int(label))
        if images:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)
