"""Matryoshka MLP: one set of weights, many FFN widths (DESIGN §2, "mat_dims" in the public code).

At hidden size ``h`` only the first ``h`` hidden units are used: rows ``[:h]`` of ``fc1`` and columns ``[:h]``
of ``fc2``. The weights are always *sliced*, so a smaller width really costs less. When each sample has its own
width (joint training, mixed-setting inference) the samples are grouped by width and each group runs at its
sliced width. DESIGN §2 describes masking the hidden units past ``h`` instead: the same result (a masked unit
adds exactly zero to the output and gets zero gradient), but it pays for the full width on every sample, about
40% more MLP FLOPs with the default widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MatryoshkaMlp(nn.Module):
    """GELU MLP (``fc1 -> GELU -> fc2``, timm's ``Mlp`` names) with a ``hidden`` argument in ``forward``."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, hidden: int | torch.Tensor | None = None) -> torch.Tensor:
        """Apply the MLP at ``hidden`` units.

        Args:
            x: ``(B, N, in_features)``.
            hidden: None for all units; an int for one size; a ``(B,)`` integer tensor of per-sample sizes
                (fastest when sorted: the groups are then contiguous and need no gather/scatter).
        """
        if hidden is None or isinstance(hidden, int):
            h = self.fc1.out_features if hidden is None else hidden
            y = self.act(F.linear(x, self.fc1.weight[:h], self.fc1.bias[:h]))
            return F.linear(y, self.fc2.weight[:, :h], self.fc2.bias)
        if hidden.shape != (x.shape[0],):
            raise ValueError(f"per-sample hidden sizes need shape ({x.shape[0]},), got {tuple(hidden.shape)}")
        order = None
        if len(hidden) > 1 and not bool((hidden[1:] >= hidden[:-1]).all()):
            order = torch.argsort(hidden, stable=True)
            x, hidden = x[order], hidden[order]
        sizes, counts = torch.unique_consecutive(hidden, return_counts=True)
        if len(sizes) == 1:
            return self(x, int(sizes[0]))
        groups = x.split(counts.tolist())
        y = torch.cat([self(group, int(h)) for group, h in zip(groups, sizes.tolist(), strict=True)])
        return y if order is None else y[torch.argsort(order)]
