"""Typed configuration of an AdaPerceiver backbone.

The config is the single source of truth for a model's shape *and* its preprocessing: it is stored in
every checkpoint's metadata, so a checkpoint can always be rebuilt and fed correctly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class AdaPerceiverConfig:
    """Shape, adaptivity grid and preprocessing of an AdaPerceiver (DESIGN §2-3)."""

    # --- input -------------------------------------------------------------------------------------------------
    img_size: int = 28  # square input side in pixels; other sizes are rejected (no silent resampling)
    in_chans: int = 1  # input channels (1 = grayscale)
    num_classes: int = 10  # classifier outputs
    mean: tuple[float, ...] = (0.2860,)  # per-channel normalisation mean, applied inside the model to [0, 1] input
    std: tuple[float, ...] = (0.3530,)  # per-channel normalisation std
    resize_size: int = 0  # data pipelines: resize the shorter side to this, then center-crop img_size; 0 = no crop
    # --- input adapter -----------------------------------------------------------------------------------------
    patch_size: int = 4  # side of one patch; the patch grid is (img_size / patch_size)^2
    stem: Literal["patch", "conv"] = "conv"  # "patch": one conv k=s=patch; "conv": 3x3 convs + GELU, conv to patch
    stem_dims: tuple[int, ...] = (32,)  # channels of the "conv" stem's 3x3 convs
    stem_strides: tuple[int, ...] = ()  # stride of each of those convs; () = 2 for the first, 1 for the rest
    stem_exits: tuple[int, ...] = ()  # input-side axis: after these many convs (< all; 0 = none) the stem can exit
    patch_context_kernel: int = 0  # odd k: add a depthwise k x k conv over the patch grid to the tokens; 0 = none
    patch_dim: int = 0  # width of the patch tokens the read attends over; 0 = embed_dim (narrower = cheaper read k/v)
    embed_mlp: bool = False  # LayerNorm + full-width GELU MLP (not residual) on the tokens after the position embedding
    # --- latent transformer ------------------------------------------------------------------------------------
    embed_dim: int = 128  # D: width of latents and the residual stream (and of patches unless patch_dim)
    num_heads: int = 4  # attention heads (head dim = D / heads, must be even for RoPE)
    depth: int = 8  # L: number of latent blocks = number of early-exit points
    ffn_ratio: float = 4.0  # MLP hidden = int(width * ffn_ratio) at FFN width `width`
    qkv_bias: bool = True  # bias on q/k/v projections
    ls_init_values: float = 1e-5  # LayerScale init (small, so a fresh block is near-identity)
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    rope_theta: float = 100.0  # RoPE base; small because latent indices only go up to max(token_granularities)
    rope_fp32: bool = False  # RoPE angles computed in float32 (the release's tables) instead of float64 then rounded
    norm_eps: float = 1e-5  # eps of every LayerNorm (torch's default; the release uses timm's 1e-6)
    head_norm: bool = True  # LayerNorm before the linear classifier (the release has none)
    latent_mask: Literal["block", "none"] = "block"  # block-causal latent attention, or none (granularities not nested)
    # --- adaptivity grid ---------------------------------------------------------------------------------------
    token_granularities: tuple[int, ...] = (4, 8, 16, 32)  # nested latent counts g_1 < ... < g_K = N_max
    widths: tuple[int, ...] = (32, 64, 128)  # Matryoshka FFN widths w_1 < ... < w_M = D ("mat_dims")
    name: str = "adaperceiver_fmnist"  # registry name this config was built from (informational)

    def __post_init__(self) -> None:
        # normalise lists (from YAML/JSON) to tuples so configs compare and hash by value
        for name in ("mean", "std", "token_granularities", "widths", "stem_dims", "stem_strides", "stem_exits"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on shapes that cannot work, with a message naming the field."""
        g, w = self.token_granularities, self.widths
        if not g or list(g) != sorted(set(g)) or g[0] < 1:
            raise ValueError(f"token_granularities must be strictly increasing positive ints, got {g}")
        if not w or list(w) != sorted(set(w)) or w[0] < 1 or w[-1] != self.embed_dim:
            raise ValueError(f"widths must be strictly increasing and end at embed_dim={self.embed_dim}, got {w}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
            raise ValueError(f"embed_dim={self.embed_dim} / num_heads={self.num_heads} must be an even integer")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be divisible by patch_size={self.patch_size}")
        if self.stem == "conv":
            if not self.stem_dims or min(self.stem_dims) < 1:
                raise ValueError(f"stem_dims must be a non-empty list of positive channel counts, got {self.stem_dims}")
            strides = self.conv_stem_strides
            if len(strides) != len(self.stem_dims) or min(strides) < 1 or self.patch_size % math.prod(strides):
                raise ValueError(
                    f"stem_strides needs one positive stride per stem_dims entry ({len(self.stem_dims)}) whose "
                    f"product divides patch_size={self.patch_size}, got {self.stem_strides}"
                )
        exits = self.stem_exits
        if exits:
            if self.stem != "conv":
                raise ValueError(f"stem_exits needs the conv stem (stem: conv), got stem={self.stem!r}")
            n = len(self.stem_dims)
            if list(exits) != sorted(set(exits)) or exits[0] < 0 or exits[-1] >= n:
                raise ValueError(f"stem_exits must be strictly increasing conv counts in 0..{n - 1}, got {exits}")
        if self.patch_dim < 0:
            raise ValueError(f"patch_dim must be 0 (= embed_dim) or a positive token width, got {self.patch_dim}")
        k = self.patch_context_kernel
        if k < 0 or (k and k % 2 == 0):
            raise ValueError(f"patch_context_kernel must be 0 (none) or an odd positive kernel size, got {k}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per channel), got {self.mean}/{self.std}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.latent_mask not in ("block", "none"):
            raise ValueError(f"latent_mask must be 'block' or 'none', got {self.latent_mask!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.resize_size and self.resize_size < self.img_size:
            raise ValueError(f"resize_size={self.resize_size} must be 0 or >= img_size={self.img_size}")

    # --- derived quantities ------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return self.token_granularities[-1]

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def conv_stem_strides(self) -> tuple[int, ...]:
        """Stride of each 3x3 conv of the conv stem (``stem_strides``, or 2 then 1s when it is empty)."""
        return self.stem_strides or (2,) + (1,) * (len(self.stem_dims) - 1)

    @property
    def stages(self) -> tuple[int, ...]:
        """The input-side axis: number of stem convs run at each stage (``stem_exits`` + all of them)."""
        return (*self.stem_exits, len(self.stem_dims)) if self.stem == "conv" else (1,)

    def stem_side(self, convs: int) -> int:
        """Side in pixels of the conv stem's feature map after its first ``convs`` convolutions (padded 3x3)."""
        side = self.img_size
        for stride in self.conv_stem_strides[:convs]:
            side = -(-side // stride)
        return side

    @property
    def token_dim(self) -> int:
        """Width of the patch tokens (``patch_dim``, or ``embed_dim`` when it is 0)."""
        return self.patch_dim or self.embed_dim

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def embed_mlp_hidden(self) -> int:
        """Hidden units of the input adapter's MLP (``embed_mlp``): always the full ``int(token_dim * ffn_ratio)``."""
        return int(self.token_dim * self.ffn_ratio) if self.embed_mlp else 0

    def hidden_dim(self, width: int) -> int:
        """MLP hidden units used at FFN width ``width`` (DESIGN §2, Matryoshka FFN)."""
        return int(width * self.ffn_ratio)

    # --- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdaPerceiverConfig:
        if "stem_dim" in d:  # checkpoints written before stem_dims existed
            d = {**{k: v for k, v in d.items() if k != "stem_dim"}, "stem_dims": (d["stem_dim"],)}
        if not d.get("extra", True):  # checkpoints written while the config had an (always empty) `extra` field
            d = {k: v for k, v in d.items() if k != "extra"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdaPerceiverConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> AdaPerceiverConfig:
        return self.from_dict({**self.to_dict(), **overrides})
