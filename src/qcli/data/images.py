"""Image folders as data sets: ImageFolder layout, optional class list, lazy decoding.

Images are decoded in `__getitem__`, not up front, so a 50,000-image folder costs only its
file list until it is read. A file that fails to decode is recorded in `.skipped` and raises
`UnreadableImage`, which `iterate()` catches: one bad JPEG never ends an evaluation, and the
caller can report how many were left out.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from qcli.errors import QcliError, UsageError
from qcli.models.input_spec import InputSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
CLASS_LIST_FILES = ("wnids.txt", "classes.txt")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

ClassList = str | Path | Sequence[str]


class UnreadableImage(QcliError):
    """An image file that PIL cannot decode; `iterate()` skips it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"image '{path}' cannot be read ({reason})")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalized float tensor [3, H, W] following an InputSpec.

    Resize the shorter side to `resize`, center-crop to `size`, and if the result still
    differs from `size` (no crop, or an image smaller than the crop) resize to exactly `size`.
    """

    spec: InputSpec

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The geometric part alone: uint8 [3, H, W] at the model's size (what QAT caches)."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        spec = self.spec
        mode = InterpolationMode(spec.interpolation)
        image = to_rgb8(image)
        if spec.resize is not None:
            image = F.resize(image, [spec.resize], interpolation=mode)
        if spec.crop:
            image = F.center_crop(image, list(spec.size))
        if (image.height, image.width) != spec.size:
            image = F.resize(image, list(spec.size), interpolation=mode)
        return F.pil_to_tensor(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> the model's normalized float input."""
        x = pixels.float().div_(255.0)
        mean = torch.tensor(self.spec.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device).view(3, 1, 1)
        return x.sub_(mean).div_(std)


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit grayscale is scaled down (PIL's convert would clip it to white)."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        # "I" holds 16-bit PNGs on some Pillow versions, 8-bit data only after manual edits
        if image.mode != "I" or values.max(initial=0) > 255:
            values = values / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def read_class_list(path: Path) -> list[str]:
    """One class id per line (blank lines ignored); label = line number among the ids."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise QcliError(f"class list '{path}' cannot be read ({exc})") from exc
    names = [n for n in names if n]
    if not names:
        raise QcliError(f"class list '{path}' is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise QcliError(f"class list '{path}' names {duplicates[0]!r} more than once")
    return names


def is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def select_indices(count: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random subset of `limit` positions (kept in file order), or all of them."""
    if limit is None or limit >= count:
        return list(range(count))
    if limit <= 0:
        raise UsageError(f"--limit must be positive, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


class ImageFolderSet(Dataset):
    """`root/<class>/<image>` (labelled) or `root/<image>` (unlabelled, label -1).

    Labels are the folder's position in sorted order, or its line in a class list (given, or
    `root/wnids.txt` / `root/classes.txt`) so a subset of classes keeps the full label space.
    """

    def __init__(
        self,
        root: str | Path,
        input_spec: InputSpec,
        class_list: ClassList | None = None,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.input_spec = input_spec
        self.transform = ImageTransform(input_spec)
        samples, self.classes = scan_folder(self.root, class_list)
        self.samples = [samples[i] for i in select_indices(len(samples), limit, seed)]
        self.skipped: list[tuple[str, str]] = []

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._read(index, self.transform), self.samples[index][1]

    def _read(self, index: int, transform) -> torch.Tensor:
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return transform(image)
        except DECODE_ERRORS as exc:
            reason = str(exc) or type(exc).__name__
            if all(p != str(path) for p, _ in self.skipped):
                self.skipped.append((str(path), reason))
            raise UnreadableImage(path, reason) from exc

    def pixels(self, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image decoded once, as uint8 [N, 3, H, W] at the model's size, with its labels
        (unreadable files left out and recorded): 50,000 CIFAR images are 150 MB, so training
        epochs re-augment them in memory instead of decoding JPEGs again."""
        h, w = self.input_spec.size
        out = torch.empty((len(self), 3, h, w), dtype=torch.uint8)
        labels = torch.empty(len(self), dtype=torch.int64)
        n = 0
        for i in range(len(self)):
            try:
                out[n] = self._read(i, self.transform.pixels)
            except UnreadableImage:
                continue
            labels[n] = self.samples[i][1]
            n += 1
            if progress is not None:
                progress(1)
        return out[:n], labels[:n]


def scan_folder(
    root: Path, class_list: ClassList | None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """(sorted (path, label) pairs, class names); QcliError for a missing or empty folder."""
    if not root.exists():
        raise QcliError(f"image folder '{root}' does not exist")
    if not root.is_dir():
        raise QcliError(f"image folder '{root}' is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        samples = [(p, -1) for p in sorted(root.iterdir()) if is_image(p)]
        if not samples:
            raise QcliError(f"image folder '{root}' holds no images (jpg, jpeg, png, bmp, webp)")
        return samples, []
    classes, source = _resolve_classes(root, class_dirs, class_list)
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for folder in class_dirs:
        if folder.name not in index:
            raise QcliError(f"class folder '{folder}' is not in the class list {source}")
        label = index[folder.name]
        samples += [(p, label) for p in sorted(folder.rglob("*")) if is_image(p)]
    if not samples:
        raise QcliError(f"image folder '{root}' holds no images (jpg, jpeg, png, bmp, webp)")
    return samples, classes


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in the standard class order (timm ships them), or ()
    without timm. Folders named by wnids then get ImageNet labels, not sorted positions."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return ()
    info = ImageNetInfo()
    return tuple(info.index_to_label_name(i) for i in range(info.num_classes()))


def _resolve_classes(
    root: Path, class_dirs: list[Path], class_list: ClassList | None
) -> tuple[list[str], str]:
    if class_list is None:
        for name in CLASS_LIST_FILES:
            if (root / name).is_file():
                class_list = root / name
                break
    if class_list is None:
        names = [p.name for p in class_dirs]
        imagenet = imagenet_wnids()
        if imagenet and set(names) <= set(imagenet):
            return list(imagenet), "(ImageNet-1k class ids: the folders are ImageNet wnids)"
        return names, "(sorted folder names)"
    if isinstance(class_list, str | Path):
        return read_class_list(Path(class_list)), f"'{class_list}'"
    return [str(c) for c in class_list], "given"
