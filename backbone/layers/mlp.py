"""Matryoshka MLP: one set of weights, many FFN widths (DESIGN §2, "mat_dims" in the public code).

At hidden size ``h`` only the first ``h`` hidden units are used: rows ``[:h]`` of ``fc1`` and columns ``[:h]``
of ``fc2``. At inference the weights are *sliced* (real savings); in training each sample may have its own
width, which is applied by zeroing the hidden units past its ``h`` (same result, one batched matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MatryoshkaMlp(nn.Module):
    """GELU MLP with the signature of ``timm.layers.Mlp`` plus a ``hidden`` argument in ``forward``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)
        if norm_layer is not None:
            raise ValueError("MatryoshkaMlp does not support a hidden norm (it would mix widths)")

    def forward(self, x: torch.Tensor, hidden: int | torch.Tensor | None = None) -> torch.Tensor:
        """Apply the MLP at ``hidden`` units.

        Args:
            x: ``(B, N, in_features)``.
            hidden: None for all units; an int to *slice* the weights; a ``(B,)`` long tensor of per-sample
                hidden sizes to *mask* (training with mixed widths).
        """
        if hidden is None or isinstance(hidden, int):
            h = self.fc1.out_features if hidden is None else hidden
            b1 = self.fc1.bias[:h] if self.fc1.bias is not None else None
            y = self.drop(self.act(F.linear(x, self.fc1.weight[:h], b1)))
            return self.drop(F.linear(y, self.fc2.weight[:, :h], self.fc2.bias))
        y = self.drop(self.act(self.fc1(x)))
        keep = torch.arange(y.shape[-1], device=y.device)[None, :] < hidden.to(y.device)[:, None]  # (B, hidden)
        y = y * keep[:, None, :].to(y.dtype)
        return self.drop(self.fc2(y))
