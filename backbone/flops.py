"""Analytic FLOPs of one setting, and a FlopCounterMode measurement to check them against (DESIGN §3).

Convention: 2 FLOPs per multiply-add of every matmul and convolution that runs for one image, exactly what
``torch.utils.flop_counter.FlopCounterMode`` counts. Element-wise work (norms, GELU, softmax, RoPE, biases)
is not counted there and not here; it is under 2% of the total for the shipped shapes.

Two small terms do not depend on the input (the read's latent queries and the write's output query); they are
computed once per batch but counted here per image, so the analytic figure is exact at batch 1 and a slight
over-estimate for larger batches.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from backbone.config import AdaPerceiverConfig

if TYPE_CHECKING:
    from torch import nn

# Parts of a setting that every setting of the same image shares (computed once by ``AdaPerceiver.embed``).
SHARED_PARTS = ("embed", "read_kv")


def flops_breakdown(cfg: AdaPerceiverConfig, num_tokens: int, depth: int, width: int) -> dict[str, int]:
    """FLOPs per image of each part of the forward pass at setting ``(num_tokens, depth, width)``."""
    g, d, p, c, t = num_tokens, cfg.embed_dim, cfg.num_patches, cfg.num_classes, cfg.token_dim
    h = cfg.hidden_dim(width)
    if cfg.stem == "conv":
        embed, side, strides = 0, cfg.img_size, cfg.conv_stem_strides
        for c_in, c_out, stride in zip((cfg.in_chans, *cfg.stem_dims[:-1]), cfg.stem_dims, strides, strict=True):
            side = -(-side // stride)  # output side of a padded 3x3 conv
            embed += 2 * side * side * 9 * c_in * c_out
        rest = cfg.patch_size // math.prod(strides)
        embed += 2 * p * cfg.stem_dims[-1] * rest**2 * t
    else:
        embed = 2 * p * cfg.in_chans * cfg.patch_size**2 * t
    embed += 2 * p * t * cfg.patch_context_kernel**2  # depthwise conv over the patch grid (0 when off)
    block = 6 * g * d * d + 4 * g * g * d + 2 * g * d * d + 4 * g * d * h  # qkv, attention, proj, MLP
    return {
        "embed": embed,  # stem convolution(s) and patch context
        "read_kv": 4 * p * t * d,  # keys/values of all patches
        "read": 2 * g * d * d + 4 * g * p * d + 2 * g * d * d,  # latent queries, attention, out proj
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
