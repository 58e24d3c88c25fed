"""Observation specs: the cheap per-image features the controller sees before it picks a setting (DESIGN §5).

Every spec works from the :class:`~backbone.model.PatchMemory` that :meth:`AdaPerceiver.embed` returns. That memory
(the patch tokens of a stage) is shared with whatever setting the controller then runs at that stage, so its cost is
already part of ``FLOPs(setting)``; :meth:`ObservationSpec.flops` counts only the controller's *extra* work on top.

Features:

* ``pooled``: ``layer_norm(mean over patches of memory.tokens)`` without affine parameters, ``D`` values (here ``D``
  is the patch-token width ``cfg.token_dim``). Each element of a unit-variance, zero-mean vector of length ``D`` is
  at most ``sqrt(D - 1)`` in magnitude, so the bounds ``+-sqrt(D)`` hold exactly and need no clipping.
* ``probe``: top-1 probability, top-1 minus top-2 probability and entropy (nats) of the cheapest setting
  (fewest tokens, depth 1, narrowest width) run from the same memory, 3 values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backbone.flops import SHARED_PARTS, flops_breakdown, stem_conv_flops
from backbone.model import AdaPerceiver, PatchMemory
from backbone.prediction_stats import STATS, prediction_stats, stats_flops
from backbone.settings import Setting

PROBE_STATS = STATS
probe_stats = prediction_stats  # the probe's features: the statistics of its logits


def probe_setting(model: AdaPerceiver) -> Setting:
    """The cheapest setting: the probe whose confidence the controller sees (at the shallowest input stage)."""
    return model.grid.smallest


def observe_embed(model: AdaPerceiver, images: torch.Tensor) -> PatchMemory:
    """The memory observations are computed from: the images embedded at the probe's (shallowest) stage.

    A setting at that stage shares it; a deeper setting continues the stem from its feature map
    (``AdaPerceiver.continue_embed``), so the probe's stem work is never redone.
    """
    return model.embed(images, probe_setting(model).stage)


def _pooled(model: AdaPerceiver, memory: PatchMemory) -> torch.Tensor:
    tokens = memory.tokens
    return F.layer_norm(tokens.mean(1), (tokens.shape[-1],))


def run_probe(model: AdaPerceiver, memory: PatchMemory) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``(B, g0, D)`` after the probe's one block, and its logits ``(B, classes)``.

    The latents are returned so that adaptive inference can continue from them when the controller picks a
    setting with the probe's tokens and width (see :meth:`ObservationSpec.reused_flops`).
    """
    p = probe_setting(model)
    latents = model.forward_blocks(model.read_latents(memory, p.tokens), 0, p.depth, p.width)
    return latents, model.forward_head(latents)


def _pooled_flops(model: AdaPerceiver) -> int:
    cfg = model.cfg
    return cfg.num_patches * cfg.token_dim + 8 * cfg.token_dim  # mean over patches + layer norm


def _probe_flops(model: AdaPerceiver) -> int:
    parts = flops_breakdown(model.cfg, *probe_setting(model))
    return sum(v for k, v in parts.items() if k not in SHARED_PARTS) + stats_flops(model.cfg.num_classes)


def _memory_flops(model: AdaPerceiver) -> tuple[int, int]:
    """(FLOPs of the observation's memory, the part of it that every setting does anyway).

    Without stem exits every setting shares the whole memory (the stem's patch tokens, and the read's keys/values
    if the probe's read projects them; a folded read has none). With them, a deeper setting shares only the stem
    convolutions of the probe's stage and continues from there; the probe stage's token projection and patch
    context are the controller's own cost.
    """
    parts = flops_breakdown(model.cfg, *probe_setting(model))
    memory = sum(parts[k] for k in SHARED_PARTS)
    stage = probe_setting(model).stage
    return memory, memory if stage is None else stem_conv_flops(model.cfg, stage)


@dataclass(frozen=True)
class ObservationSpec:
    """A named observation: which feature groups it concatenates, in order.

    Attributes:
        name: Registry key (stored in outcome tables and controller sidecars).
        pooled: Include the layer-normed pooled patch embedding (``D`` values).
        probe: Include the probe setting's confidence statistics (3 values, see :data:`PROBE_STATS`).
    """

    name: str
    pooled: bool
    probe: bool

    def dim(self, model: AdaPerceiver) -> int:
        """Number of features ``F``."""
        return model.cfg.token_dim * self.pooled + len(PROBE_STATS) * self.probe

    def low(self, model: AdaPerceiver) -> np.ndarray:
        """Finite float32 lower bounds ``(F,)``."""
        d = model.cfg.token_dim
        pooled = np.full(d, -math.sqrt(d), np.float32) if self.pooled else np.zeros(0, np.float32)
        probe = np.zeros(len(PROBE_STATS), np.float32) if self.probe else np.zeros(0, np.float32)
        return np.concatenate([pooled, probe]).astype(np.float32)

    def high(self, model: AdaPerceiver) -> np.ndarray:
        """Finite float32 upper bounds ``(F,)``: ``sqrt(D)``; probability 1, margin 1, entropy ``log C``."""
        d, c = model.cfg.token_dim, model.cfg.num_classes
        pooled = np.full(d, math.sqrt(d), np.float32) if self.pooled else np.zeros(0, np.float32)
        probe = np.array([1.0, 1.0, math.log(c)], np.float32) if self.probe else np.zeros(0, np.float32)
        return np.concatenate([pooled, probe]).astype(np.float32)

    @torch.no_grad()
    def embed_and_probe(
        self, model: AdaPerceiver, images: torch.Tensor
    ) -> tuple[PatchMemory, tuple[torch.Tensor, torch.Tensor] | None]:
        """The probe stage's memory of ``images`` and, if this spec observes the probe, its latents and logits
        (:func:`run_probe`): the work inference does before the controller decides, kept for the setting to reuse."""
        memory = observe_embed(model, images)
        return memory, (run_probe(model, memory) if self.probe else None)

    @torch.no_grad()
    def compute(
        self, model: AdaPerceiver, memory: PatchMemory, probe_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features ``(B, F)`` float32 of a batch, from the memory that :meth:`AdaPerceiver.embed` returned.

        ``probe_logits`` (from :func:`run_probe`) saves running the probe again when the caller already did.
        The caller puts the model in eval mode (the probe runs the model).
        """
        parts = []
        if self.pooled:
            parts.append(_pooled(model, memory).float())
        if self.probe:
            parts.append(probe_stats(run_probe(model, memory)[1] if probe_logits is None else probe_logits))
        return torch.cat(parts, dim=-1)

    def flops(self, model: AdaPerceiver) -> int:
        """Controller-overhead FLOPs per image: the observation's work beyond what every setting does anyway
        (without stem exits, the shared ``embed`` and any ``read_kv`` are paid by the setting)."""
        memory, common = _memory_flops(model)
        return memory - common + _pooled_flops(model) * self.pooled + _probe_flops(model) * self.probe

    def reused_flops(self, model: AdaPerceiver) -> np.ndarray:
        """FLOPs of each setting (an array of the grid's shape) that the observation has already done, beyond what
        :meth:`flops` leaves to every setting, so they are not done (or counted) twice.

        A setting at the probe's stage shares the observation's memory; one with the probe's tokens and width
        also continues from the probe's latents after block 1 (its read and first block are the probe's), and at
        depth 1 it *is* the probe and takes its logits. Adaptive inference really skips this work, and
        :func:`policy.evaluation.evaluate_actions` subtracts it, so reported FLOPs are what actually runs.
        """
        grid = model.grid
        memory, common = _memory_flops(model)
        reused = np.zeros(grid.shape, np.int64)
        (reused[0] if grid.stages else reused)[...] = memory - common  # the settings of the probe's stage
        if self.probe:
            parts = flops_breakdown(model.cfg, *grid.smallest)
            reused[self.continues_probe(model)] += parts["read"] + parts["blocks"]
            reused[grid.smallest_index] += parts["write"] + parts["head"]
        return reused

    def continues_probe(self, model: AdaPerceiver) -> np.ndarray:
        """Which settings (a bool array of the grid's shape) start from the probe's latents after its block:
        those at the probe's stage, tokens and width (every depth). None without the probe."""
        grid = model.grid
        mask = np.zeros(grid.shape, bool)
        if self.probe:
            mask[(*grid.smallest_index[:-2], slice(None), 0)] = True  # stage/token index 0, every depth, width 0
        return mask


OBSERVATIONS: dict[str, ObservationSpec] = {
    "pooled_probe": ObservationSpec("pooled_probe", pooled=True, probe=True),
    "pooled": ObservationSpec("pooled", pooled=True, probe=False),
    "probe": ObservationSpec("probe", pooled=False, probe=True),
}
DEFAULT_OBSERVATION = "pooled_probe"


def get_observation(name: str) -> ObservationSpec:
    """Look a spec up by name; ValueError lists the valid names."""
    try:
        return OBSERVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown observation {name!r}; choose one of {list(OBSERVATIONS)}") from None
