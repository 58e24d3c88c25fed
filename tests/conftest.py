"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from backbone.data import ImageDataset


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (tests share the machine with other jobs, and a single-process
    reference must sum in the same order as one-thread child processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def square_images() -> Callable[[int, int], ImageDataset]:
    """Factory of synthetic 28x28 uint8 sets: noise plus a bright square whose position is the class (learnable)."""

    def make(n: int, seed: int) -> ImageDataset:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        for i, y in enumerate(labels.tolist()):
            r, c = divmod(y, 5)
            images[i, 0, 4 + 10 * r : 10 + 10 * r, 2 + 5 * c : 6 + 5 * c] = 255
        return ImageDataset(images, labels, [str(i) for i in range(10)], "synthetic")

    return make
