"""Datasets: Fashion-MNIST named splits from IDX files and generic image folders.

The whole dataset is kept in memory as uint8 tensors so the training loop can index batches directly instead of going
through a per-sample ``DataLoader``; ``__getitem__`` exists for compatibility with standard torch tooling.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "ADAPERCEIVER_DATA_DIR"
SPLITS = ("backbone-train", "policy-train", "test")
BACKBONE_TRAIN_SIZE = 50_000
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UINT8 = 0x08
_IDX_NDIM = {1: "labels", 3: "images"}  # the only IDX layouts Fashion-MNIST uses
_INSTALL_HINT = f"install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir / set {DATA_DIR_ENV}"


class DataError(ValueError):
    """Raised for any missing, malformed or inconsistent dataset input, so callers can catch one type."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Pick the Fashion-MNIST directory: explicit argument, then ``$ADAPERCEIVER_DATA_DIR``, then the Debian default.

    Args:
        data_dir: Directory given on the command line, or None to fall back to the environment/default.

    Returns:
        The chosen directory (not checked for existence; loading reports missing files precisely).
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an IDX file (gzip-compressed or plain), validating the header strictly so corrupt data fails loudly.

    Only unsigned-byte 1-D (labels, magic 0x00000801) and 3-D (images, magic 0x00000803) files are accepted.

    Args:
        path: File to read; compression is detected from the gzip magic bytes, not the suffix.

    Returns:
        A read-only uint8 array with the shape given in the header.

    Raises:
        DataError: If the file cannot be read, the header is invalid, or the payload size does not match the dims.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UINT8:
        raise DataError(f"{path}: unsupported IDX dtype code 0x{dtype_code:02x} (only 0x08 unsigned byte)")
    if ndim not in _IDX_NDIM:
        raise DataError(f"{path}: unsupported IDX ndim {ndim} (expected 1 for labels or 3 for images)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected, actual = math.prod(dims), len(raw) - header
    if actual != expected:
        raise DataError(f"{path}: IDX payload has {actual} bytes but dims {dims} need {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: Path) -> np.ndarray:
    """Memoise decoding per resolved file so loading two splits does not decompress the train file twice."""
    return read_idx(path)


def _find_idx(data_dir: Path, stem: str) -> Path:
    """Locate ``stem.gz`` or plain ``stem`` inside the data directory, explaining how to get it if absent."""
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate.resolve()
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {data_dir}; {_INSTALL_HINT}")


class ImageDataset(Dataset):
    """In-memory labelled image set; stores uint8 to keep Fashion-MNIST at ~50 MB instead of ~200 MB as float.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``; use :meth:`as_float` or indexing for values in [0, 1].
        labels: int64 tensor ``(N,)`` of class indices into ``classes``.
        classes: Human-readable class names.
        name: Identifier for logs (split name or folder path).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str) -> None:
        """Validate shapes eagerly so a bad dataset fails at load time, not mid-training.

        Raises:
            DataError: If the dataset is empty, shapes/dtypes are wrong, or labels fall outside ``classes``.
        """
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise DataError(f"{name}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{name}: {images.shape[0]} images but labels have shape {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise DataError(f"{name}: dataset is empty")
        labels = labels.to(torch.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
            raise DataError(f"{name}: labels must lie in 0..{len(classes) - 1}")
        self.images, self.labels, self.classes, self.name = images, labels, list(classes), name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return one ``(C, H, W)`` float image in [0, 1] and its integer label."""
        return self.images[index].float().div_(255.0), int(self.labels[index])

    def as_float(self) -> torch.Tensor:
        """Return all images as float32 in [0, 1]; allocates a new tensor, so call once per device transfer."""
        return self.images.float().div_(255.0)

    def subset(self, n: int) -> ImageDataset:
        """Return the first ``n`` samples (a view, no copy), e.g. to keep tests and CI runs fast."""
        if n <= 0:
            raise DataError(f"{self.name}: subset size must be positive, got {n}")
        return ImageDataset(self.images[:n], self.labels[:n], self.classes, f"{self.name}[:{n}]")

    def __repr__(self) -> str:
        return f"ImageDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


def load_split(split: str, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load a named Fashion-MNIST split; the official train set is cut so backbone and policy never share images.

    Args:
        split: One of :data:`SPLITS`: ``backbone-train`` (train[:50000]), ``policy-train`` (train[50000:]) or
            ``test`` (official 10k test set).
        data_dir: Directory with the IDX files; see :func:`resolve_data_dir`.

    Returns:
        The split as an :class:`ImageDataset` with images of shape ``(N, 1, 28, 28)``.

    Raises:
        DataError: For an unknown split, missing files, or inconsistent image/label files.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    prefix = "t10k" if split == "test" else "train"
    image_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = _read_idx_cached(image_path), _read_idx_cached(label_path)
    if images.ndim != 3:
        raise DataError(f"{image_path}: expected a 3-D image file, got {images.ndim}-D")
    if labels.ndim != 1:
        raise DataError(f"{label_path}: expected a 1-D label file, got {labels.ndim}-D")
    if len(images) != len(labels):
        raise DataError(f"{image_path}: {len(images)} images but {label_path.name} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{label_path}: labels must lie in 0..{len(FASHION_MNIST_CLASSES) - 1}")
    part = {"backbone-train": slice(None, BACKBONE_TRAIN_SIZE), "policy-train": slice(BACKBONE_TRAIN_SIZE, None)}
    sel = part.get(split, slice(None))
    # Copy out of the cached read-only buffer so callers may mutate their tensors without corrupting the cache.
    image_t = torch.from_numpy(images[sel].copy()).unsqueeze(1)
    label_t = torch.from_numpy(labels[sel].astype(np.int64))
    return ImageDataset(image_t, label_t, FASHION_MNIST_CLASSES, split)


def load_image_folder(root: str | os.PathLike[str], image_size: int | tuple[int, int], channels: int) -> ImageDataset:
    """Load a ``root/<class>/<image>`` tree so the model can be trained on data other than Fashion-MNIST.

    Args:
        root: Directory with one sub-folder per class; sorted folder names give the class indices.
        image_size: Target size, either ``S`` for ``S x S`` or ``(H, W)``; images are resized bilinearly.
        channels: 1 for grayscale ("L") or 3 for "RGB".

    Returns:
        An :class:`ImageDataset` named after ``root`` with images of shape ``(N, channels, H, W)``.

    Raises:
        DataError: If ``root`` has no classes, a class has no images, an image is unreadable, or args are invalid.
    """
    root = Path(root)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height <= 0 or width <= 0:
        raise DataError(f"image_size must be positive, got {image_size}")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders")
    mode = "L" if channels == 1 else "RGB"
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for index, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {root / cls} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            try:
                with Image.open(file) as img:
                    resized = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"{file}: unreadable image ({exc})") from exc
            arr = np.asarray(resized, dtype=np.uint8)
            arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(index)
    images = torch.from_numpy(np.stack(arrays))
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), classes, str(root))
