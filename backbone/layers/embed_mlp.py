"""Input-adapter MLP: LayerNorm then a full-width GELU MLP on the patch tokens, after the position embedding.

The released AdaPerceiver (``use_embed_ffn``) maps its patch tokens through this before the read. It is not
residual and never narrowed by the FFN-width axis, so its FLOPs belong to the part every setting shares.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from backbone.layers.mlp import MatryoshkaMlp


class EmbedMlp(nn.Module):
    """Tokens ``(B, P, dim)`` -> ``mlp(norm(tokens))`` (timm ``Mlp`` names ``fc1``/``fc2``), same shape."""

    def __init__(self, dim: int, hidden: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.mlp = MatryoshkaMlp(dim, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens))
