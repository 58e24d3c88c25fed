"""Every setting's outcome on a batch of images: one ``forward_all`` pass per (input stage, FFN width).

The basis of fixed-setting evaluation, outcome tables and the training monitor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from backbone.model import AdaPerceiver
from backbone.prediction_stats import prediction_stats


@dataclass
class Sweep:
    """Per-sample outcome of every setting: arrays of shape ``(n, *grid.shape)`` (``(n, [S,] K, L, M)``)."""

    correct: np.ndarray  # bool
    loss: np.ndarray  # float32 cross-entropy
    pred: np.ndarray  # int16 predicted class
    confidence: np.ndarray  # float32 top-1 softmax probability (for confidence early exit)
    margin: np.ndarray  # float32 top-1 minus top-2 probability (the sequential controller's per-step view)
    entropy: np.ndarray  # float32 entropy of the softmax, nats


@torch.no_grad()
def sweep(
    model: AdaPerceiver,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    widths: Sequence[int] | None = None,
    progress: bool = False,
) -> Sweep:
    """Run every setting (for each width in ``widths``, default all) over ``images`` in [0, 1].

    Per batch: the stem runs once, each deeper input stage continuing from the last; per stage and width one
    ``forward_all`` gives every (granularity, depth). Batches go to the model's device; results come back as numpy.
    """
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    was_training = model.training
    model.eval()
    grid = model.grid
    device = next(model.parameters()).device
    widths = list(grid.widths if widths is None else widths)
    stages = grid.stages or (None,)
    k, depth = len(grid.tokens), len(grid.depths)
    shape = (len(images), *grid.shape[:-1], len(widths))
    correct, loss, pred = np.zeros(shape, bool), np.zeros(shape, np.float32), np.zeros(shape, np.int16)
    confidence, margin, entropy = (np.zeros(shape, np.float32) for _ in range(3))
    starts = range(0, len(images), batch_size)
    bar = tqdm(total=len(starts) * len(stages) * len(widths), desc="settings sweep", unit="pass", disable=not progress)
    try:
        for s in starts:
            x, y = images[s : s + batch_size].to(device), labels[s : s + batch_size].to(device)
            memory = None
            for i, stage in enumerate(stages):
                memory = model.embed(x, stage) if memory is None else model.continue_embed(memory, stage)
                rows = (slice(s, s + len(x)), *((i,) if grid.stages else ()))
                for m, width in enumerate(widths):
                    logits = model.forward_all(memory, width=width)  # (b, K, L, C)
                    p = logits.argmax(-1)
                    ce = F.cross_entropy(logits.permute(0, 3, 1, 2), y[:, None, None].expand(-1, k, depth),
                                         reduction="none")  # fmt: skip
                    at = (*rows, Ellipsis, m)
                    correct[at] = (p == y[:, None, None]).cpu().numpy()
                    loss[at] = ce.cpu().numpy()
                    pred[at] = p.cpu().numpy()
                    stats = prediction_stats(logits).cpu().numpy()  # (b, K, L, 3)
                    confidence[at], margin[at], entropy[at] = stats[..., 0], stats[..., 1], stats[..., 2]
                    bar.update()
    finally:
        bar.close()
        model.train(was_training)
    return Sweep(correct, loss, pred, confidence, margin, entropy)


def accuracy_grid(model: AdaPerceiver, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> np.ndarray:
    """Accuracy of every setting, shape ``grid.shape`` (the width axis: the widths swept, all by default)."""
    return sweep(model, images, labels, **kwargs).correct.mean(0)
