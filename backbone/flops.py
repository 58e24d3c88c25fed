"""Analytic FLOPs of one setting, and a FlopCounterMode measurement to check them against (DESIGN §3).

Convention: 2 FLOPs per multiply-add of every matmul and convolution that runs for one image, exactly what
``torch.utils.flop_counter.FlopCounterMode`` counts. Element-wise work (norms, GELU, softmax, RoPE, biases)
is not counted there and not here; it is under 2% of the total for the shipped shapes.

Small terms that do not depend on the input (the read's latent queries, taken through the key projection when the
read is folded, and the write's output query) are computed once per batch but counted here per image, so the
analytic figure is exact at batch 1 and a slight over-estimate for larger batches.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from backbone.config import AdaPerceiverConfig

if TYPE_CHECKING:
    from torch import nn

# Parts of a setting that settings of the same image and stage share (``AdaPerceiver.embed``; the patch keys/values
# only among settings whose read is not folded, :func:`read_is_folded`).
SHARED_PARTS = ("embed", "read_kv")


def stem_conv_flops(cfg: AdaPerceiverConfig, convs: int) -> int:
    """FLOPs per image of the conv stem's first ``convs`` 3x3 convolutions (what a deeper stage continues from)."""
    total = 0
    for i, (c_in, c_out) in enumerate(zip((cfg.in_chans, *cfg.stem_dims[:-1]), cfg.stem_dims[:convs], strict=False)):
        side = cfg.stem_side(i + 1)
        total += 2 * side * side * 9 * c_in * c_out
    return total


def embed_flops(cfg: AdaPerceiverConfig, stage: int | None = None) -> int:
    """FLOPs per image of the input adapter at ``stage`` (stem convs run; None = all): convs, projection to the
    patch tokens (an early exit's 1x1 after pooling, or the full projection), patch context, adapter MLP."""
    p, t = cfg.num_patches, cfg.token_dim
    if cfg.stem == "conv":
        stage = cfg.stages[-1] if stage is None else stage
        embed = stem_conv_flops(cfg, stage)
        if stage == cfg.stages[-1]:
            rest = cfg.patch_size // math.prod(cfg.conv_stem_strides)
            embed += 2 * p * cfg.stem_dims[-1] * rest**2 * t
        elif stage == 0:  # linear patch embedding of the image
            embed += 2 * p * cfg.in_chans * cfg.patch_size**2 * t
        else:  # average pooling is element-wise (not counted), then a 1x1 conv on the patch grid
            embed += 2 * p * cfg.stem_dims[stage - 1] * t
    else:
        embed = 2 * p * cfg.in_chans * cfg.patch_size**2 * t
    embed += 2 * p * t * cfg.patch_context_kernel**2  # depthwise conv over the patch grid (0 when off)
    return embed + 4 * p * t * cfg.embed_mlp_hidden  # full-width MLP after the position embedding (0 when off)


def _read_flops(cfg: AdaPerceiverConfig, num_tokens: int, folded: bool) -> tuple[int, int]:
    """(keys/values of all patches, the rest of the read) per image, projected or folded (:func:`read_is_folded`)."""
    g, d, p, t, heads = num_tokens, cfg.embed_dim, cfg.num_patches, cfg.token_dim, cfg.num_heads
    if folded:  # queries, queries through W_k, scores and weighted sums over the patch tokens, W_v, out proj
        return 0, 2 * g * d * d + 2 * g * d * t + 4 * heads * g * p * t + 2 * g * t * d + 2 * g * d * d
    return 4 * p * t * d, 2 * g * d * d + 4 * g * p * d + 2 * g * d * d  # k/v; queries, attention, out proj


def read_is_folded(cfg: AdaPerceiverConfig, num_tokens: int) -> bool:
    """Whether the read of ``num_tokens`` latents runs folded: its queries taken through the key projection and its
    weighted patch tokens through the value projection (:meth:`CrossAttention.attend_folded`), which skips projecting
    every patch's key and value. The same function either way; folded is chosen where it has fewer FLOPs, which is
    when there are fewer (heads x latents) than about ``embed_dim`` (the small settings)."""
    return sum(_read_flops(cfg, num_tokens, True)) < sum(_read_flops(cfg, num_tokens, False))


def flops_breakdown(
    cfg: AdaPerceiverConfig, num_tokens: int, depth: int, width: int, stage: int | None = None
) -> dict[str, int]:
    """FLOPs per image of each part of the forward pass at setting ``(num_tokens, depth, width, stage)``."""
    g, d, c = num_tokens, cfg.embed_dim, cfg.num_classes
    h = cfg.hidden_dim(width)
    block = 6 * g * d * d + 4 * g * g * d + 2 * g * d * d + 4 * g * d * h  # qkv, attention, proj, MLP
    read_kv, read = _read_flops(cfg, g, read_is_folded(cfg, g))
    return {
        "embed": embed_flops(cfg, stage),  # stem convolution(s), projection to tokens, patch context
        "read_kv": read_kv,  # keys/values of all patches (none when the read is folded)
        "read": read,  # the rest of the read cross-attention
        "blocks": depth * block,
        "write": 2 * d * d + 4 * g * d * d + 4 * g * d + 2 * d * d,  # query, k/v of g latents, attention, proj
        "head": 2 * d * c,
    }


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (not registered in torch's counter)."""
    b, h, q_len, e = query_shape
    k_len, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * q_len * k_len * e + 2 * b * h * q_len * k_len * ev


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU attention kernel that ``scaled_dot_product_attention`` uses."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def measure_flops(model: nn.Module, x: torch.Tensor, **forward_kwargs: Any) -> int:
    """FLOPs that FlopCounterMode sees on one real ``model(x, **forward_kwargs)`` call (whole batch).

    Runs with autograd on: under ``no_grad`` the counter's module tracker trips over expanded parameters.
    """
    counter = flop_counter()
    with counter:
        model(x, **forward_kwargs)
    return counter.get_total_flops()
