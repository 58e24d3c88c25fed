"""Pre-norm transformer block over latents: attention and a Matryoshka MLP, each with LayerScale."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath, LayerScale
from torch import nn

from backbone.layers.attention import SelfAttention
from backbone.layers.mlp import MatryoshkaMlp
from backbone.layers.rope import RotaryEmbedding1d


class Block(nn.Module):
    """``x + LS(attn(LN(x)))`` then ``x + LS(mlp(LN(x), hidden))`` (timm's ``Block`` layout and names)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float = 1e-5,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values=init_values)
        self.norm2 = norm_layer(dim)
        self.mlp = MatryoshkaMlp(dim, int(dim * ffn_ratio))
        self.ls2 = LayerScale(dim, init_values=init_values)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding1d,
        attn_mask: torch.Tensor | None = None,
        hidden: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_mlp(self.forward_attn(x, rope, attn_mask), hidden)

    def forward_attn(
        self, x: torch.Tensor, rope: RotaryEmbedding1d, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The attention half, ``x + LS(attn(LN(x)))``: the same for every FFN width."""
        return x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope, attn_mask)))

    def forward_mlp(self, x: torch.Tensor, hidden: int | torch.Tensor | None = None) -> torch.Tensor:
        """The MLP half, ``x + LS(mlp(LN(x), hidden))``: the only part that depends on the FFN width."""
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x), hidden)))
