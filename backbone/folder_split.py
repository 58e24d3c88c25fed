"""One split of an image folder (``ROOT/<split>/<class>/<image>``), read with a backbone's own preprocessing.

Files are listed with torchvision's ``ImageFolder`` helpers (sorted class folders, sorted files) and decoded with
Pillow in a torch ``DataLoader`` with worker processes and a tqdm progress bar. The preprocessing comes from the
backbone's config: channels (``in_chans``: L or RGB), ``resize_size`` (shorter side, then a centre crop of
``img_size``) or, when it is 0, a resize to ``img_size x img_size``; images stay uint8 until the model sees them.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.datasets.folder import find_classes, make_dataset
from tqdm import tqdm

from backbone.config import AdaPerceiverConfig
from backbone.data import IMAGE_SUFFIXES, DataError, ImageDataset

Sample = tuple[str, int]  # (path relative to the split folder, class index)


def preprocessing(cfg: AdaPerceiverConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> uint8 ``(C, img_size, img_size)`` tensor, the way the backbone ``cfg`` expects its input."""
    if cfg.in_chans not in (1, 3):
        raise DataError(f"image folders need a backbone with 1 or 3 input channels, not {cfg.in_chans}")
    mode, size = ("L" if cfg.in_chans == 1 else "RGB"), cfg.img_size
    resize = (
        [transforms.Resize(cfg.resize_size), transforms.CenterCrop(size)]
        if cfg.resize_size
        else [transforms.Resize((size, size))]
    )
    pipeline = transforms.Compose([*resize, transforms.PILToTensor()])
    return lambda img: pipeline(img.convert(mode))


def scan(folder: Path) -> tuple[list[str], list[Sample]]:
    """Class names and ``(relative path, class)`` of every image under ``folder/<class>/``; DataError if empty."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    try:
        classes, index = find_classes(str(folder))
        found = make_dataset(str(folder), index, extensions=tuple(sorted(IMAGE_SUFFIXES)))
    except FileNotFoundError as e:  # torchvision: no class folder, or a class folder without images
        raise DataError(f"{folder}: {' '.join(str(e).split())}") from None
    return classes, [(Path(p).relative_to(folder).as_posix(), label) for p, label in found]


class FolderSplit(Dataset):
    """Labelled image files of one split folder (or a chosen part of it), decoded on demand.

    ``dataset[i]`` is ``(uint8 image, label, sha256[:16] of the file's bytes, error)``: a file Pillow cannot read
    gives a zero image and a one-line ``error`` naming it, raised as :class:`DataError` by :meth:`batches` in the main
    process (an exception inside a worker would arrive as a multi-line traceback).
    """

    def __init__(self, folder: Path, classes: list[str], samples: list[Sample], name: str) -> None:
        if not samples:
            raise DataError(f"{name}: no images")
        self.folder, self.classes, self.samples, self.name = Path(folder), list(classes), list(samples), name
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self._transform: Callable[[Image.Image], torch.Tensor] | None = None
        self._shape: tuple[int, int, int] = (1, 1, 1)
        self._fingerprint: str | None = None

    @classmethod
    def open(cls, folder: Path, name: str | None = None) -> FolderSplit:
        classes, samples = scan(Path(folder))
        return cls(folder, classes, samples, name or str(folder))

    def preprocessed_for(self, cfg: AdaPerceiverConfig) -> FolderSplit:
        """This split, decoded the way the backbone ``cfg`` expects."""
        out = FolderSplit(self.folder, self.classes, self.samples, self.name)
        out._transform, out._shape = preprocessing(cfg), (cfg.in_chans, cfg.img_size, cfg.img_size)
        return out

    def restricted(self, keep: Callable[[str], bool], name: str) -> FolderSplit:
        """The files whose relative path passes ``keep`` (same classes and preprocessing)."""
        out = FolderSplit(self.folder, self.classes, [s for s in self.samples if keep(s[0])], name)
        out._transform, out._shape = self._transform, self._shape
        return out

    def subset(self, n: int) -> FolderSplit:
        """The first ``n`` files (smoke tests), like :meth:`ImageDataset.subset`."""
        kept = set(r for r, _ in self.samples[:n])
        return self.restricted(kept.__contains__, f"{self.name}[:{n}]")

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> Path:
        return self.folder / self.samples[i][0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, str]:
        if self._transform is None:
            raise RuntimeError("call preprocessed_for(cfg) before reading images")
        path, label = self.path(i), self.samples[i][1]
        try:
            raw = path.read_bytes()
            with Image.open(io.BytesIO(raw)) as img:
                image = self._transform(img)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return torch.zeros(self._shape, dtype=torch.uint8), label, "", f"{path}: unreadable image ({e})"
        return image, label, hashlib.sha256(raw).hexdigest()[:16], ""

    def batches(
        self, batch_size: int = 256, workers: int = 0, progress: bool = True, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """``(uint8 images, labels, file hashes)`` of files ``start:stop`` in order, read by ``workers`` processes."""
        indices = range(start, len(self) if stop is None else stop)
        loader = DataLoader(Subset(self, indices), batch_size=batch_size, num_workers=workers, shuffle=False)
        with tqdm(total=len(indices), desc=f"reading {self.name}", unit="img", disable=not progress) as bar:
            for images, labels, hashes, errors in loader:
                bad = next((e for e in errors if e), None)
                if bad:
                    raise DataError(bad)
                bar.update(len(labels))
                yield images, labels, list(hashes)

    def read_all(
        self, batch_size: int = 256, workers: int = 0, progress: bool = True
    ) -> tuple[ImageDataset, list[str]]:
        """All images in memory as an :class:`ImageDataset`, and the sha256[:16] of every file's bytes."""
        images, labels, hashes = [], [], []
        for x, y, h in self.batches(batch_size, workers, progress):
            images.append(x)
            labels.append(y)
            hashes += h
        return ImageDataset(torch.cat(images), torch.cat(labels), self.classes, self.name), hashes

    def file_hashes(self, progress: bool = True) -> list[str]:
        """sha256[:16] of every file's bytes, without decoding (to compare splits for shared images)."""
        return [
            hashlib.sha256(self.path(i).read_bytes()).hexdigest()[:16]
            for i in tqdm(range(len(self)), desc=f"hashing {self.name}", unit="img", disable=not progress)
        ]

    def fingerprint(self) -> str:
        """sha256 of (relative path, class, size, mtime) of every file: names the split's content in table caches.

        Computed once per split object (it stats every file; a table build and its cache check both ask)."""
        if self._fingerprint is None:
            h = hashlib.sha256("\n".join(self.classes).encode())
            for rel, label in self.samples:
                st = (self.folder / rel).stat()
                h.update(f"|{rel}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"FolderSplit(name={self.name!r}, n={len(self)}, classes={len(self.classes)})"
