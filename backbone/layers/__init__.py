"""Building blocks of the AdaPerceiver, one idea per file."""

from backbone.layers.attention import CrossAttention, SelfAttention
from backbone.layers.block import Block
from backbone.layers.embed_mlp import EmbedMlp
from backbone.layers.masks import block_causal_mask
from backbone.layers.mlp import MatryoshkaMlp
from backbone.layers.patch_context import PatchContext
from backbone.layers.rope import RotaryEmbedding1d
from backbone.layers.stem import ConvStem

__all__ = [
    "Block",
    "ConvStem",
    "CrossAttention",
    "EmbedMlp",
    "MatryoshkaMlp",
    "PatchContext",
    "RotaryEmbedding1d",
    "SelfAttention",
    "block_causal_mask",
]
