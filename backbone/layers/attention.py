"""Self- and cross-attention with 1-D RoPE on a chosen side (DESIGN §2, "RoPE placement").

* latent self-attention: RoPE on q and k, block-causal mask;
* read (latents <- patches): RoPE on the query (latent) side only;
* write (output query <- latents): RoPE on the key (latent) side only.

Both use ``F.scaled_dot_product_attention`` through :func:`attention` (which answers attention over exactly two
keys in closed form at inference); the FLOPs of the library's CPU kernel are registered for ``FlopCounterMode`` in
``backbone/flops.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from backbone.layers.rope import RotaryEmbedding1d

# (batch x heads x queries) rows from which two-key attention in closed form beats the library kernel (under it the
# closed form's few more operator calls cost more than they save): python -m benchmarks.two_key_attention
TWO_KEY_MIN_ROWS = 128


def two_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` for exactly two keys, in closed form.

    A softmax of two scores is the sigmoid of their difference, so ``out = v1 + sigmoid(q . (k0 - k1) / sqrt(d)) *
    (v0 - v1)``: one dot product per query and a lerp, equal up to float rounding (and fewer FLOPs than the two
    matmuls the analytic count keeps for it).
    """
    k0, k1 = k.unbind(-2)
    v0, v1 = v.unbind(-2)
    weight0 = torch.sigmoid((q @ (k0 - k1).unsqueeze(-1)) * q.shape[-1] ** -0.5)  # (..., queries, 1)
    return torch.lerp(v1.unsqueeze(-2), v0.unsqueeze(-2), weight0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask)``, over two keys by :func:`two_key_attention` at inference.

    Every setting the default controllers pick has 2 latents, so its blocks' self-attention and its write-out
    attend over two keys, for which the library's CPU flash kernel is slow: it is made for long sequences
    (``python -m benchmarks.two_key_attention`` times both). The closed form is used without a mask, with grad off
    (training keeps the library kernel and its backward) and from ``TWO_KEY_MIN_ROWS`` rows.
    """
    if (
        attn_mask is None
        and k.shape[-2] == 2
        and q.shape[:-1].numel() >= TWO_KEY_MIN_ROWS
        and not torch.is_grad_enabled()
    ):
        return two_key_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention over latents with RoPE on q/k.

    q, k and v are one fused linear (mathematically the separate q/k/v linears of DESIGN §2, one matmul).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding1d, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rope(qkv[:2])  # one rotation for q and k together: fewer small ops per block at small batch
        y = attention(q, k, qkv[2], attn_mask)
        return self.proj(_merge_heads(y))


class CrossAttention(nn.Module):
    """Pre-norm cross-attention ``CrossAttn(q=LN_q(x_q), kv=LN_kv(x_kv))`` with separate sink/source norms.

    The key/value side is exposed as :meth:`project_kv` so callers can compute it once and reuse it: the read's
    patch keys/values are shared by every setting, and the write's latent keys/values for ``g`` latents are the
    first ``g`` rows of those for all latents.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        rope_side: Literal["q", "k"] | None,
        qkv_bias: bool = True,
        kv_dim: int | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.rope_side = rope_side
        self.norm_q = norm_layer(dim)
        self.norm_kv = norm_layer(kv_dim or dim)  # the source may be narrower (patch tokens, ``patch_dim``)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project_q(self, x_q: torch.Tensor, rope: RotaryEmbedding1d | None = None) -> torch.Tensor:
        q = _split_heads(self.q(self.norm_q(x_q)), self.num_heads)
        return rope(q) if self.rope_side == "q" else q

    def project_kv(
        self, x_kv: torch.Tensor, rope: RotaryEmbedding1d | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = (_split_heads(t, self.num_heads) for t in self.kv(self.norm_kv(x_kv)).chunk(2, dim=-1))
        return (rope(k) if self.rope_side == "k" else k), v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of projected ``q`` over projected ``k``/``v``, then the output projection."""
        return self.proj(_merge_heads(attention(q, k, v, attn_mask)))

    def attend_folded(self, q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        """``attend(q, *project_kv(x_kv))`` (no RoPE on the key side) without projecting any key or value.

        With ``k_i = W_k x_i + b_k``, ``q . k_i = (W_k^T q) . x_i + q . b_k``; the last term is the same for every
        key, so the softmax drops it. The weights sum to one, so ``sum_i a_i v_i = W_v (sum_i a_i x_i) + b_v``. The
        queries go through ``W_k`` once per batch (they do not depend on the input), and each image pays only the
        scores and weighted sums over its tokens: fewer FLOPs than the keys/values of every token while
        ``heads x queries`` is under about ``dim`` (``backbone.flops.read_is_folded``).

        Args:
            q: Projected queries ``(1, heads, Q, head_dim)``, the same for the whole batch.
            x_kv: Source tokens ``(B, N, kv_dim)`` (before the key/value norm).
        """
        if self.rope_side == "k":
            raise ValueError("a read with RoPE on its keys cannot be folded")
        b = x_kv.shape[0]
        heads, queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
        w_k, w_v = self.kv.weight.view(2, heads, head_dim, -1).unbind(0)  # (heads, head_dim, kv_dim) each
        u = ((q[0] @ w_k) * head_dim**-0.5).flatten(0, 1)  # (heads * Q, kv_dim)
        x = self.norm_kv(x_kv)
        attn = (x @ u.t()).softmax(dim=1)  # (B, N, heads * Q): the softmax runs over the N source tokens
        z = (attn.transpose(1, 2) @ x).view(b, heads, queries, -1)  # (B, heads, Q, kv_dim) weighted tokens
        out = (z.transpose(0, 1).flatten(1, 2) @ w_v.transpose(1, 2)).view(heads, b, queries, head_dim)
        if self.kv.bias is not None:
            out = out + self.kv.bias.view(2, heads, 1, 1, head_dim)[1]
        return self.proj(out.permute(1, 2, 0, 3).reshape(b, queries, heads * head_dim))
