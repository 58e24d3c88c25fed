"""Every setting's outcome on a batch of images: one ``forward_all`` pass per FFN width gives all (tokens, depth).

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


@dataclass
class Sweep:
    """Per-sample outcome of every setting: arrays of shape ``(n, K, L, M)``."""

    correct: np.ndarray  # bool
    loss: np.ndarray  # float32 cross-entropy
    pred: np.ndarray  # int16 predicted class
    confidence: np.ndarray  # float32 top-1 softmax probability (for confidence early exit)


@torch.no_grad()
def sweep(
    model: AdaPerceiver,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    widths: Sequence[int] | None = None,
    progress: bool = False,
) -> Sweep:
    """Run every (granularity, depth) for each width in ``widths`` (default: all) over ``images`` in [0, 1]."""
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    was_training = model.training
    model.eval()
    widths = list(model.cfg.widths if widths is None else widths)
    k, depth = len(model.cfg.token_granularities), model.cfg.depth
    shape = (len(images), k, depth, len(widths))
    correct, loss, pred = np.zeros(shape, bool), np.zeros(shape, np.float32), np.zeros(shape, np.int16)
    confidence = np.zeros(shape, np.float32)
    batches = [(m, s) for m in range(len(widths)) for s in range(0, len(images), batch_size)]
    try:
        for m, s in tqdm(batches, desc="settings sweep", unit="batch", disable=not progress):
            x, y = images[s : s + batch_size], labels[s : s + batch_size]
            logits = model.forward_all(x, width=widths[m])  # (b, K, L, C)
            p = logits.argmax(-1)
            ce = F.cross_entropy(logits.permute(0, 3, 1, 2), y[:, None, None].expand(-1, k, depth), reduction="none")
            correct[s : s + len(x), ..., m] = (p == y[:, None, None]).numpy()
            loss[s : s + len(x), ..., m] = ce.numpy()
            pred[s : s + len(x), ..., m] = p.numpy()
            confidence[s : s + len(x), ..., m] = logits.softmax(-1).amax(-1).numpy()
    finally:
        model.train(was_training)
    return Sweep(correct, loss, pred, confidence)


def accuracy_grid(model: AdaPerceiver, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> np.ndarray:
    """Accuracy ``(K, L, M')`` of every setting (``M'`` = the widths swept, all by default)."""
    return sweep(model, images, labels, **kwargs).correct.mean(0)
