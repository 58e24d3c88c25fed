"""AdaPerceiver: one set of weights that runs at any (tokens, depth, width) setting (arXiv 2511.18105, DESIGN §2).

Data flow for one setting ``(g, d, w)``::

    image -> normalise -> stem (+ patch context) + pos-embed (-> LN + MLP) -> patches -------(k, v)--+
                                                                                                    v
    learned latent x g (RoPE on the query side) --------------------------------------------------> read cross-attn
    -> d blocks (block-causal self-attn, Matryoshka MLP at width w)
    -> write: one learned output query cross-attends to the g latents (RoPE on keys) -> LN -> linear head

The options the released checkpoints need (``embed_mlp``, ``norm_eps``, ``head_norm=False``, ``rope_fp32``,
``latent_mask="none"``) are off by default, and off they add no parameter: older checkpoints load unchanged.

Patches never enter the block stack. The patch tokens are the same for every setting of a stage, so
:meth:`AdaPerceiver.embed` computes them once (:class:`PatchMemory`) and any number of settings can be run from
them (the probe of the controller and the setting it then picks share this work). A read of few latents is folded:
its queries go through the key projection instead of every patch through it (``CrossAttention.attend_folded``);
larger reads project the patch keys/values once per memory and share them.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from backbone.config import AdaPerceiverConfig
from backbone.flops import flops_breakdown, read_is_folded
from backbone.layers import (
    Block,
    ConvStem,
    CrossAttention,
    EmbedMlp,
    PatchContext,
    RotaryEmbedding1d,
    block_causal_mask,
)
from backbone.settings import SettingsGrid

Width = int | Sequence[int] | torch.Tensor | None


@dataclass
class PatchMemory:
    """What every setting of one stage shares for a batch: the patch tokens and, once a read needs them, the read's
    keys/values over them (:meth:`AdaPerceiver.read_keys_values`; a folded read never does).

    ``features`` is the conv stem's feature map at ``stage`` (None for a patch stem or per-sample stages), kept so
    that a deeper stage can continue from it (:meth:`AdaPerceiver.continue_embed`).
    """

    tokens: torch.Tensor  # (B, P, token_dim) patch embedding + position embedding
    features: torch.Tensor | None = None  # (B, C, H, W) stem feature map the tokens were projected from
    stage: int | None = None  # stem convs run (an entry of cfg.stages); None = per-sample stages
    k: torch.Tensor | None = None  # (B, heads, P, head_dim), computed on first use
    v: torch.Tensor | None = None  # (B, heads, P, head_dim)

    def __getitem__(self, index: torch.Tensor | slice) -> PatchMemory:
        """Rows of the batch (used to run a group of samples at one setting)."""
        features = None if self.features is None else self.features[index]
        k, v = (None, None) if self.k is None else (self.k[index], self.v[index])
        return PatchMemory(self.tokens[index], features, self.stage, k, v)


def width_groups(widths: np.ndarray, hidden_dim) -> list[tuple[torch.Tensor | None, int]]:
    """Per-row FFN widths -> ``[(row indices or None for all rows, hidden units), ...]``, one per distinct width."""
    distinct = np.unique(widths)
    if len(distinct) == 1:
        return [(None, hidden_dim(int(distinct[0])))]
    return [(torch.from_numpy(np.flatnonzero(widths == w)), hidden_dim(int(w))) for w in distinct.tolist()]


class AdaPerceiver(nn.Module):
    """Perceiver-style classifier adaptive in latent tokens, depth (early exit) and FFN width."""

    def __init__(self, cfg: AdaPerceiverConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = SettingsGrid.from_config(cfg)  # every (tokens, depth, width) and its FLOPs
        d, t = cfg.embed_dim, cfg.token_dim
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        if cfg.stem == "conv":
            self.stem = ConvStem(
                cfg.img_size, cfg.patch_size, cfg.in_chans, t, cfg.stem_dims, cfg.conv_stem_strides, cfg.stem_exits
            )
        else:
            self.stem = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, t)  # one conv, kernel = stride = patch
        k = cfg.patch_context_kernel
        self.patch_context = PatchContext(t, cfg.img_size // cfg.patch_size, k) if k else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, t))
        if cfg.embed_mlp:  # only registered when on, so checkpoints without it keep their keys
            self.embed_mlp = EmbedMlp(t, cfg.embed_mlp_hidden, norm)
        self.latent = nn.Parameter(torch.zeros(1, 1, d))  # one learned vector, repeated g times
        self.rope = RotaryEmbedding1d(cfg.head_dim, cfg.max_tokens, cfg.rope_theta, fp32=cfg.rope_fp32)
        self.read = CrossAttention(d, cfg.num_heads, rope_side="q", qkv_bias=cfg.qkv_bias, kv_dim=t, norm_layer=norm)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.ffn_ratio, cfg.qkv_bias, cfg.ls_init_values, dpr[i], norm)
            for i in range(cfg.depth)
        )
        self.out_query = nn.Parameter(torch.zeros(1, 1, d))
        self.write = CrossAttention(d, cfg.num_heads, rope_side="k", qkv_bias=cfg.qkv_bias, norm_layer=norm)
        self.head_norm = norm(d) if cfg.head_norm else nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes)
        self.register_buffer("attn_mask", block_causal_mask(cfg.token_granularities), persistent=False)
        # write-out masks for forward_all: row k lets the output query see latents [0, g_k)
        grans = torch.tensor(cfg.token_granularities)
        self.register_buffer("write_masks", torch.arange(cfg.max_tokens)[None] < grans[:, None], persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        for p in (self.pos_embed, self.latent, self.out_query):
            trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention, read by ``create_optimizer_v2``): the position
        embedding and the learned latent and output query are embeddings, not weights of a map."""
        return {"pos_embed", "latent", "out_query"}

    # --- validation --------------------------------------------------------------------------------------------
    def resolve_setting(self, num_tokens: int | None, depth: int | None, width: Width) -> tuple[int, int, Width]:
        """Fill ``None`` with the largest value and check each axis; ValueError names the valid choices.

        Integer-likes (numpy integers from Gymnasium actions, 0-d tensors) are accepted and returned as ``int``.
        """
        cfg = self.cfg
        g = cfg.max_tokens if num_tokens is None else _as_int(num_tokens, "num_tokens")
        if g not in cfg.token_granularities:
            raise ValueError(
                f"num_tokens={g} is not a token granularity; choose one of {list(cfg.token_granularities)}"
            )
        d = cfg.depth if depth is None else _as_int(depth, "depth")
        if not 1 <= d <= cfg.depth:
            raise ValueError(f"depth={d} is outside 1..{cfg.depth}")
        if width is None:
            w: Width = cfg.widths[-1]
        elif _is_scalar(width):
            w = _as_int(width, "width")
        else:
            w = [_as_int(v, "width") for v in (width.tolist() if isinstance(width, torch.Tensor) else width)]
        bad = sorted({v for v in ([w] if isinstance(w, int) else w) if v not in cfg.widths})
        if bad:
            raise ValueError(f"width {bad} is not an FFN width; choose from {list(cfg.widths)}")
        return g, d, w

    def _hidden(self, width: int | list[int], batch: int) -> int | torch.Tensor:
        """Width(s) -> MLP hidden units: an int for the whole batch, or a ``(B,)`` tensor of per-sample sizes."""
        if isinstance(width, int):
            return self.cfg.hidden_dim(width)
        if len(width) != batch:
            raise ValueError(f"per-sample width needs {batch} values (one per image), got {len(width)}")
        return torch.tensor([self.cfg.hidden_dim(w) for w in width], device=self.pos_embed.device)

    def check_input(self, x: torch.Tensor) -> None:
        """Reject anything but finite float images ``(B, C, img_size, img_size)`` scaled to [0, 1]."""
        cfg = self.cfg
        want = f"(B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size})"
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"expected a 4-D image batch {want}, got shape {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(f"expected {cfg.in_chans} channel(s) {want}, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"expected images of size {want}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images scaled to [0, 1], got dtype {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        lo, hi = (float(v) for v in torch.aminmax(x))  # one reduction when all is well; NaN fails both comparisons
        if not (lo >= 0.0 and hi <= 1.0):
            if not torch.isfinite(x).all():
                raise ValueError("input contains NaN or infinite values")
            raise ValueError(
                f"expected images scaled to [0, 1], got values in [{lo:.4g}, {hi:.4g}] (0-255 pixels: divide by 255; "
                "the model normalises inside, so pass images before any mean/std)"
            )

    def resolve_stage(self, stage: int | None) -> int:
        """``None`` -> the deepest stage; ValueError unless ``stage`` is one of ``cfg.stages``."""
        stages = self.cfg.stages
        s = stages[-1] if stage is None else _as_int(stage, "stage")
        if s not in stages:
            raise ValueError(f"stage={s} is not an input stage of this model; choose one of {list(stages)}")
        return s

    # --- the shared part ---------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, stage: int | None = None) -> PatchMemory:
        """Normalise, run the stem to ``stage`` (None = all of it) and project the read's keys/values: the work
        every setting of that stage shares."""
        self.check_input(x)
        stage = self.resolve_stage(stage)
        x = (x - self.mean) / self.std
        if self.cfg.stem != "conv":
            return self._memory(self.stem(x), None, stage)
        features = self.stem.features(x, 0, stage)
        return self._memory(self.stem.tokens(features, stage), features, stage)

    def continue_embed(
        self, memory: PatchMemory, stage: int | None = None, rows: torch.Tensor | None = None
    ) -> PatchMemory:
        """The memory of a deeper ``stage``, continuing the stem from ``memory``'s feature map (nothing redone).

        ``rows`` continues only those rows of the batch, gathering the feature map alone (the tokens and keys/values
        of the shallower stage are not needed).
        """
        stage = self.resolve_stage(stage)
        if memory.stage == stage:
            return memory if rows is None else memory[rows]
        if memory.features is None or memory.stage is None or memory.stage > stage:
            raise ValueError(f"cannot continue a stage-{memory.stage} memory to stage {stage}")
        features = memory.features if rows is None else memory.features[rows]
        features = self.stem.features(features, memory.stage, stage)
        return self._memory(self.stem.tokens(features, stage), features, stage)

    def embed_per_sample(self, x: torch.Tensor, stages: torch.Tensor) -> PatchMemory:
        """Memory whose row ``i`` is at stage ``stages[i]`` (joint training over the input-side axis).

        Rows are sorted deepest first, so the rows still in the stem are a prefix of the batch: each convolution
        runs once, on exactly the rows that need it, and each row exits through its own stage's projection.
        """
        self.check_input(x)
        if stages.shape != (x.shape[0],):
            raise ValueError(f"need one stage per image ({x.shape[0]}), got shape {tuple(stages.shape)}")
        bad = sorted(set(stages.tolist()) - set(self.cfg.stages))
        if bad:
            raise ValueError(f"stages {bad} are not input stages of this model; choose from {list(self.cfg.stages)}")
        order = torch.argsort(stages, descending=True, stable=True)
        sorted_stages = stages[order]
        h = ((x - self.mean) / self.std)[order]
        tokens = h.new_empty(x.shape[0], self.cfg.num_patches, self.cfg.token_dim)
        done = 0
        for stage in self.cfg.stages:
            alive = int((sorted_stages >= stage).sum())
            if alive == 0:
                break
            h = self.stem.features(h[:alive], done, stage)
            done = stage
            first = int((sorted_stages > stage).sum())  # rows exiting here are the tail of the running prefix
            if first < alive:
                tokens[first:alive] = self.stem.tokens(h[first:alive], stage).to(tokens.dtype)
        unsorted = torch.empty_like(tokens)
        unsorted[order] = tokens
        return self._memory(unsorted, None, None)

    def _memory(self, tokens: torch.Tensor, features: torch.Tensor | None, stage: int | None) -> PatchMemory:
        if self.cfg.patch_context_kernel:  # the patch context returns a new tensor: add the position embedding in place
            tokens = self.patch_context(tokens).add_(self.pos_embed)
        else:
            tokens = tokens + self.pos_embed
        if self.cfg.embed_mlp:
            tokens = self.embed_mlp(tokens)
        return PatchMemory(tokens, features, stage)

    def _as_memory(self, x: torch.Tensor | PatchMemory, stage: int | None) -> PatchMemory:
        """Images -> their memory at ``stage``; a memory -> itself, continued to ``stage`` when one is given."""
        if isinstance(x, PatchMemory):
            return x if stage is None else self.continue_embed(x, stage)
        return self.embed(x, stage)

    def read_keys_values(self, memory: PatchMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """The read's keys and values over ``memory``'s patches, computed once and kept in the memory."""
        if memory.k is None:
            memory.k, memory.v = self.read.project_kv(memory.tokens)
        return memory.k, memory.v

    def read_latents(self, memory: PatchMemory, num_tokens: int) -> torch.Tensor:
        """Latents ``(B, g, D)`` after reading the patches, before any block. The queries do not depend on the input.

        Few latents read folded (``backbone.flops.read_is_folded``): no patch key or value is projected.
        """
        latents = self.latent.expand(1, num_tokens, -1)
        q = self.read.project_q(latents, self.rope)
        if read_is_folded(self.cfg, num_tokens):
            return latents + self.read.attend_folded(q, memory.tokens)
        k, v = self.read_keys_values(memory)
        return latents + self.read.attend(q.expand(k.shape[0], -1, -1, -1), k, v)

    def _write(self, latents: torch.Tensor, write_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from latents; with ``write_mask`` (Q, N) one write-out per mask row: ``(B, Q, classes)``."""
        b = latents.shape[0]
        q = self.write.project_q(self.out_query)  # (1, heads, 1, head_dim), input-independent
        k, v = self.write.project_kv(latents, self.rope)
        if write_mask is not None:
            q = q.expand(b, -1, write_mask.shape[0], -1)
        out = self.out_query + self.write.attend(q.expand(b, -1, -1, -1), k, v, write_mask)
        return self.head(self.head_norm(out))

    # --- public forward API (timm-style) ----------------------------------------------------------------------
    def forward_features(
        self,
        x: torch.Tensor | PatchMemory,
        num_tokens: int | None = None,
        depth: int | None = None,
        width: Width = None,
        stage: int | None = None,
    ) -> torch.Tensor:
        """Latents ``(B, g, D)`` after ``depth`` blocks at ``num_tokens`` latents, FFN ``width``, input ``stage``."""
        g, d, w = self.resolve_setting(num_tokens, depth, width)
        memory = self._as_memory(x, stage)
        return self.forward_blocks(self.read_latents(memory, g), 0, d, w)

    def forward_blocks(self, latents: torch.Tensor, start: int, stop: int, width: Width = None) -> torch.Tensor:
        """Run blocks ``start..stop-1`` (0-based) on latents ``(B, g, D)`` at FFN ``width``.

        Lets a caller continue a run where another stopped (early exit, reusing the controller's probe):
        ``forward_blocks(forward_blocks(z, 0, a), a, b) == forward_blocks(z, 0, b)``.
        """
        g, _, w = self.resolve_setting(latents.shape[1], None, width)
        if not 0 <= start <= stop <= self.cfg.depth:
            raise ValueError(f"need 0 <= start <= stop <= {self.cfg.depth}, got start={start}, stop={stop}")
        hidden = self._hidden(w, latents.shape[0])
        mask = self._latent_mask(g)
        for block in itertools.islice(self.blocks, start, stop):  # slicing a ModuleList builds a new module
            latents = block(latents, self.rope, mask, hidden)
        return latents

    def forward_block_mixed_widths(
        self, latents: torch.Tensor, index: int, widths: Sequence[int] | np.ndarray
    ) -> torch.Tensor:
        """Block ``index`` (0-based) on latents ``(B, g, D)`` whose rows each have their own FFN width.

        The attention half does not depend on the width, so it runs once for all rows; the MLP half runs once per
        distinct width on the rows that have it, at its sliced width (adaptive inference continuing a batch).
        """
        widths = np.asarray(widths)
        if widths.shape != (latents.shape[0],):
            raise ValueError(f"need one width per row ({latents.shape[0]}), got shape {widths.shape}")
        self.resolve_setting(latents.shape[1], index + 1, widths.tolist())
        return self.forward_block_grouped_unchecked(latents, index, width_groups(widths, self.cfg.hidden_dim))

    def forward_block_grouped_unchecked(
        self, latents: torch.Tensor, index: int, groups: list[tuple[torch.Tensor | None, int]]
    ) -> torch.Tensor:
        """Block ``index`` (0-based) with the attention half once on every row and the MLP half once per
        ``(rows, hidden)`` group (``rows`` None: all of them; ``hidden`` = ``cfg.hidden_dim(width)``).

        The hot path of adaptive inference: rows of one token count but several widths pay one attention instead of
        one per width, and nothing is validated (the settings come from the grid; at batch 1 the checks of
        :meth:`forward_blocks` cost about as much as the block).
        """
        block = self.blocks[index]
        z = block.forward_attn(latents, self.rope, self._latent_mask(latents.shape[1]))
        if len(groups) == 1 and groups[0][0] is None:
            return block.forward_mlp(z, groups[0][1])
        for rows, hidden in groups:  # disjoint rows: each group reads and writes only its own
            z[rows] = block.forward_mlp(z[rows], hidden)
        return z

    def _latent_mask(self, g: int) -> torch.Tensor | None:
        """Block-causal mask over ``g`` latents; with one granularity in play (or ``latent_mask="none"``) every latent
        sees all g others."""
        if self.cfg.latent_mask == "none" or g == self.cfg.token_granularities[0]:
            return None
        return self.attn_mask[:g, :g]

    def forward_head(self, latents: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` from latents ``(B, g, D)``: the write cross-attention, norm and linear head."""
        return self._write(latents)[:, 0]

    def forward(
        self,
        x: torch.Tensor | PatchMemory,
        num_tokens: int | None = None,
        depth: int | None = None,
        width: Width = None,
        stage: int | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, classes)`` at one setting; ``None`` means the largest value of that axis."""
        return self.forward_head(self.forward_features(x, num_tokens, depth, width, stage))

    def forward_all(self, x: torch.Tensor | PatchMemory, width: Width = None, stage: int | None = None) -> torch.Tensor:
        """Logits ``(B, K, L, classes)`` of every token granularity and every depth, in one pass.

        Runs ``N_max`` latents with the block-causal mask; after each block the output query is written out
        once per granularity ``g_k`` with the latents ``>= g_k`` masked away. That equals running the model
        at ``(g_k, depth)`` because the first ``g_k`` latents never depend on later ones. With
        ``latent_mask="none"`` they do, so each granularity gets its own pass.
        """
        _, _, w = self.resolve_setting(None, None, width)
        memory = self._as_memory(x, stage)
        hidden = self._hidden(w, memory.tokens.shape[0])
        if self.cfg.latent_mask == "none":
            return torch.stack([self._forward_all_depths(memory, g, hidden) for g in self.cfg.token_granularities], 1)
        latents = self.read_latents(memory, self.cfg.max_tokens)
        outs = []
        for block in self.blocks:
            latents = block(latents, self.rope, self.attn_mask, hidden)
            outs.append(self._write(latents, self.write_masks))
        return torch.stack(outs, dim=2)

    def _forward_all_depths(self, memory: PatchMemory, g: int, hidden: int | torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, classes)`` after every block at ``g`` latents (unmasked: a pass of its own)."""
        latents = self.read_latents(memory, g)
        outs = []
        for block in self.blocks:
            latents = block(latents, self.rope, None, hidden)
            outs.append(self._write(latents)[:, 0])
        return torch.stack(outs, dim=1)

    # --- compute -----------------------------------------------------------------------------------------------
    def flops(
        self,
        num_tokens: int | None = None,
        depth: int | None = None,
        width: int | None = None,
        stage: int | None = None,
    ) -> int:
        """Analytic FLOPs per image at a setting (2 per multiply-add; see ``backbone/flops.py``)."""
        g, d, w = self.resolve_setting(num_tokens, depth, width)
        if not isinstance(w, int):
            raise ValueError("flops() takes one width, not a per-sample sequence")
        return sum(flops_breakdown(self.cfg, g, d, w, self.resolve_stage(stage)).values())


def _is_scalar(v: object) -> bool:
    return not isinstance(v, (Sequence, torch.Tensor)) or (isinstance(v, torch.Tensor) and v.ndim == 0)


def _as_int(v: object, name: str) -> int:
    try:
        return operator.index(v.item() if isinstance(v, torch.Tensor) else v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None
