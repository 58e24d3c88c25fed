"""Adaptive inference over many image files, streamed through a DataLoader, timed next to the full setting.

Worker processes decode the files while the main process classifies the previous batch, so a folder of any size
runs in constant memory. Each batch is classified adaptively and (unless switched off) also at the full setting,
the two timed back to back on the same tensors: the reported images/s are compute only, decoding excluded, so
the comparison says what the controller saves, not how fast the disk is. With ``processes > 1`` the batches are
classified in that many worker processes of one thread each (:class:`policy.core_pool.CorePool`), each timing its
own batches; the compute seconds are then summed over the workers and divided by their number.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from policy.adaptive import AdaptiveClassifier, Prediction
from policy.core_pool import CorePool


class ImageFiles(Dataset):
    """Image files -> ``(float (C, H, W) in [0, 1], error message or "")``; a bad file is reported, not raised,
    so the main process can name it (an exception inside a worker arrives wrapped and unreadable)."""

    def __init__(self, files: list[Path], preprocess: Callable[[Image.Image], torch.Tensor], invert: bool) -> None:
        self.files, self.preprocess, self.invert = files, preprocess, invert

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            x = read_image(self.files[i], self.preprocess, self.invert)
        except ValueError as e:
            return torch.zeros(0), str(e)
        return x, ""


def read_image(path: Path, preprocess: Callable[[Image.Image], torch.Tensor], invert: bool = False) -> torch.Tensor:
    """``(C, H, W)`` float tensor in [0, 1] after the backbone's ``preprocess``; ValueError naming a bad file."""
    try:
        with Image.open(path) as im:
            x = preprocess(im).float() / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return 1.0 - x if invert else x


def _collate(batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor | None, str]:
    bad = next((e for _, e in batch if e), "")
    return (None if bad else torch.stack([x for x, _ in batch])), bad


@dataclass
class StreamResult:
    """Per-image predictions in file order and the compute time of both paths."""

    labels: list[int] = field(default_factory=list)
    settings: list = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    adaptive_seconds: float = 0.0
    full_seconds: float = 0.0  # 0 when the full setting was not run
    full_agrees: int = 0  # images whose adaptive label equals the full setting's

    @property
    def images(self) -> int:
        return len(self.labels)


def classify(clf: AdaptiveClassifier, images: torch.Tensor) -> tuple[Prediction, float]:
    """The adaptive prediction and its compute seconds."""
    t0 = time.perf_counter()
    pred = clf.predict(images)
    return pred, time.perf_counter() - t0


def classify_and_compare(clf: AdaptiveClassifier, images: torch.Tensor) -> tuple[Prediction, float, int, float]:
    """:func:`classify`, then the full setting on the same tensor: how many labels agree, and its seconds."""
    pred, seconds = classify(clf, images)
    t0 = time.perf_counter()
    full = clf.backbone(images).argmax(-1)
    return pred, seconds, int((full == pred.labels).sum()), time.perf_counter() - t0


def stream_predict(
    clf: AdaptiveClassifier,
    files: list[Path],
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 256,
    workers: int = 2,
    invert: bool = False,
    compare_full: bool = True,
    progress: bool = True,
    processes: int = 1,
) -> StreamResult:
    """Classify ``files`` adaptively in batches read by ``workers`` processes (and classified by ``processes``
    worker processes when more than 1); ValueError names an unreadable file."""
    loader = DataLoader(
        ImageFiles(files, preprocess, invert),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )

    def batches() -> Iterator[torch.Tensor]:
        for images, bad in loader:
            if bad:
                raise ValueError(bad)
            yield images

    step = classify_and_compare if compare_full else classify
    out = StreamResult()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(tqdm(total=len(files), desc="classifying", unit="img", disable=not progress))
        if processes > 1:
            results = stack.enter_context(CorePool(clf, processes, batch_size)).map(step, batches())
        else:
            results = (step(clf, images) for images in batches())
        for pred, seconds, *full in results:
            out.adaptive_seconds += seconds / processes
            if full:
                out.full_agrees += full[0]
                out.full_seconds += full[1] / processes
            out.labels += pred.labels.tolist()
            out.settings += pred.settings
            out.flops += np.asarray(pred.flops, dtype=float).tolist()
            bar.update(len(pred.labels))
    return out
