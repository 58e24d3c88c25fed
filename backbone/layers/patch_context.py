"""Depthwise convolution over the patch grid, added to the patch tokens before the read.

Patches never enter the block stack (DESIGN §2), so whatever context a patch token carries must be in it before
the single read. A depthwise k x k convolution on the token grid, added residually (CPVT's "positional encoding
generator"), lets each token see its neighbours for ``2 * P * D * k^2`` FLOPs (0.11 MFLOPs at 7x7 patches, D=128,
k=3). It is part of the input adapter, so its FLOPs are shared by every setting.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchContext(nn.Module):
    """Patch tokens ``(B, P, D)`` on a square grid -> ``tokens + DepthwiseConv(tokens)``, same shape."""

    def __init__(self, dim: int, grid_size: int, kernel_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv.to(memory_format=torch.channels_last)  # matches its input's layout (forward): oneDNN's NHWC path

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        # fp32 under CPU bf16 autocast, like the conv stem: oneDNN's bf16 convolutions are slow without native bf16
        with torch.autocast("cpu", enabled=False):
            # (B, P, D) is the channels-last layout of the (B, D, g, g) grid: a view, no copy, and the depthwise
            # convolution's output read back as (B, P, D) is contiguous; the residual is added into that new tensor
            # (autograd does not need a convolution's output), which saves a (B, P, D) allocation per call
            g = self.grid_size
            grid = tokens.to(self.conv.weight.dtype).reshape(b, g, g, d).permute(0, 3, 1, 2)
            return self.conv(grid).permute(0, 2, 3, 1).reshape(b, g * g, d).add_(tokens)
