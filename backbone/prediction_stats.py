"""How sure a prediction is, from its logits: top-1 probability, top-1 minus top-2 probability, entropy.

One definition for everything that looks at a running prediction: the controller's probe features, the outcome
table (every setting's statistics) and the sequential controller's per-step observation, so that a feature looked
up in a table is the feature computed live.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STATS = ("top1_prob", "margin", "entropy")


def prediction_stats(logits: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` float32: top-1 probability, top-1 minus top-2 probability (both in [0, 1]) and the entropy in
    nats (in [0, log C]) of logits ``(..., C)``."""
    logits = logits.float()
    logp = logits.log_softmax(-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values if p.shape[-1] > 1 else torch.cat([p, torch.zeros_like(p)], -1)
    entropy = (-(p * logp).sum(-1)).clamp(0.0, float(np.float32(math.log(p.shape[-1]))))
    top1 = top2[..., 0].clamp(0.0, 1.0)
    return torch.stack([top1, (top2[..., 0] - top2[..., 1]).clamp(0.0, 1.0), entropy], dim=-1)


def stats_flops(num_classes: int) -> int:
    """FLOPs of :func:`prediction_stats` per prediction: softmax (exp, sum, divide), p * log p and its sum, the
    top-2 scan and one subtraction, counted as 6 per class."""
    return 6 * num_classes
