"""1-D rotary position embedding over the latent index.

Latents start as copies of one learned vector; RoPE is the only thing that tells them apart (DESIGN §2).
Because the rotation of latent ``i`` depends on ``i`` alone, the first ``g`` latents see the same angles
whatever the total number of latents, which keeps token granularities nested.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding1d(nn.Module):
    """Precomputed cos/sin tables for positions ``0..max_len-1`` (rotate-half convention).

    ``fp32=True`` computes the angles the way the released model does (LLaMA's ``precompute_freqs_cis``: float32
    frequencies, float32 products), which differ from the float64 angles by up to ~1e-5 rad at position 256.
    Its interleaved-pairs layout is the rotate-half layout after permuting each head's q/k rows
    (``backbone.official``), so no second rotation is needed here.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 100.0, fp32: bool = False) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if fp32:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
            angles = torch.outer(torch.arange(max_len).float(), inv_freq)
        else:
            inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (max_len, head_dim/2)
        # full-width tables so that a rotation is x * cos + swap_halves(x) * signed_sin (fewer small ops than
        # splitting into halves); bit-identical to (x1 cos - x2 sin, x1 sin + x2 cos)
        cos, sin = angles.cos().float(), angles.sin().float()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)  # (max_len, head_dim)
        self.register_buffer("signed_sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``(..., N, head_dim)`` by the angles of positions ``0..N-1``."""
        n = x.shape[-2]
        cos, sin = self.cos[:n], self.signed_sin[:n]
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
