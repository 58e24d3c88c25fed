"""Compute-saving inference: each input runs at the setting its controller picked, for real.

For a batch: embed once (stem + the read's patch keys/values, shared by every setting), compute the controller's
observation from that (running the cheap probe setting), choose settings deterministically, then run the batch
grouped by (tokens, width). A group reads its latents once and goes through the blocks with early exit: rows are
sorted deepest first, so after each block the rows whose chosen depth is reached are written out and the rest
carry on as a shorter prefix of the batch (at most K x M groups, not one per setting). The group with the probe's
tokens and width continues from the probe's latents instead of redoing its read and first block. Results go back
in input order. FLOPs per image = FLOPs(chosen setting) - the probe work it reused + the controller's overhead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from backbone.checkpoint import DEFAULT_BACKBONE, load_backbone
from backbone.settings import Setting
from envs import get_observation
from envs.observations import run_probe
from policy.controller import actor_flops, choose_actions, load_ppo
from policy.sidecar import check_compatible, resolve_run


@dataclass
class Prediction:
    """Per-image results of :meth:`AdaptiveClassifier.predict`, in input order."""

    labels: torch.Tensor  # (B,) predicted class
    logits: torch.Tensor  # (B, classes)
    settings: list[Setting]  # (tokens, depth, width) each image ran at
    actions: np.ndarray  # (B, 3) grid indices of those settings
    flops: np.ndarray  # (B,) FLOPs per image, controller overhead included


class AdaptiveClassifier:
    """A frozen backbone plus the controller trained for it."""

    def __init__(self, backbone, policy, observation: str, controller_flops: int | None = None) -> None:
        self.backbone = backbone.eval()
        self.policy = policy
        self.spec = get_observation(observation)
        self.observation = observation
        self.controller_flops = (
            controller_flops if controller_flops is not None else self.spec.flops(backbone) + actor_flops(policy)
        )
        self.grid = backbone.grid
        self.reused_flops = self.spec.reused_flops(backbone)  # probe work a setting continues from, not redone

    @classmethod
    def load(
        cls, run: str | os.PathLike, backbone: str | os.PathLike | None = None, device: str = "cpu"
    ) -> AdaptiveClassifier:
        """Load a run folder (or its ``policy.json``); refuse a backbone other than the one it was trained for."""
        zip_path, sidecar = resolve_run(run)
        model = load_backbone(backbone or sidecar.get("backbone_path") or DEFAULT_BACKBONE, device=device)
        check_compatible(sidecar, model.checkpoint_sha256, model.grid, sidecar["observation"])
        ppo = load_ppo(zip_path, device=device)
        return cls(model, ppo.policy, sidecar["observation"])

    def choose(self, memory, probe_logits: torch.Tensor | None = None) -> np.ndarray:
        """Setting indices ``(B, 3)`` for a batch already embedded by ``backbone.embed``."""
        return choose_actions(self.policy, self.spec.compute(self.backbone, memory, probe_logits))

    @torch.no_grad()
    def predict(self, images: torch.Tensor | Sequence[torch.Tensor]) -> Prediction:
        """Classify ``images`` (float ``(B, C, H, W)`` in [0, 1], or a list of ``(C, H, W)``) adaptively."""
        model = self.backbone
        x = _as_batch(images)
        memory = model.embed(x)
        probe = run_probe(model, memory) if self.spec.probe else None
        actions = self.choose(memory, None if probe is None else probe[1])
        tokens, depth, widths = self.grid.values(actions)
        logits = memory.tokens.new_empty(len(x), model.cfg.num_classes)
        # rows whose setting reuses the probe's work (its tokens and width) go on from the probe's latents;
        # the same grid gives the FLOPs they skip, so execution and accounting cannot drift apart
        on_probe = self.reused_flops[tuple(actions.T)] > 0
        at_probe = on_probe & (depth == 1)
        if at_probe.any():
            logits[at_probe] = probe[1][at_probe]
        for g in np.unique(tokens).tolist():
            rows = np.flatnonzero((tokens == g) & ~at_probe)
            if len(rows) == 0:
                continue
            # one read, one pass through the blocks and one write-out per token count (widths and depths mixed)
            start = memory.tokens.new_empty(len(rows), g, model.cfg.embed_dim)
            cont = on_probe[rows]
            if cont.any():
                start[cont] = probe[0][rows[cont]]
            if not cont.all():
                start[~cont] = model.read_latents(memory[torch.from_numpy(rows[~cont])], g)
            logits[rows] = model.forward_head(self._run_blocks(start, depth[rows], widths[rows], cont))
        flops = self.grid.flops_of(actions) - self.reused_flops[tuple(actions.T)] + self.controller_flops
        return Prediction(logits.argmax(-1), logits, self.grid.settings(actions), actions, flops)

    def _run_blocks(
        self, latents: torch.Tensor, depth: np.ndarray, widths: np.ndarray, past_block1: np.ndarray
    ) -> torch.Tensor:
        """Each row through blocks ``1..depth[i]`` at ``widths[i]`` (rows with ``past_block1`` skip block 1).

        Rows are sorted deepest first, so the rows still running are always a prefix of the batch: each block
        runs once, on exactly the rows that need it (early exit without masking or wasted rows).
        """
        order = np.argsort(-depth, kind="stable")
        depth, widths, past_block1 = depth[order], widths[order], past_block1[order]
        z = latents[torch.from_numpy(order)]
        final = torch.empty_like(z)
        for d in range(1, int(depth[0]) + 1):
            alive = int((depth >= d).sum())
            z = z[:alive]
            if d == 1 and past_block1.any():
                todo = torch.from_numpy(np.flatnonzero(~past_block1[:alive]))
                if len(todo):
                    z[todo] = self.backbone.forward_block_mixed_widths(z[todo], 0, widths[todo.numpy()])
            else:
                z = self.backbone.forward_block_mixed_widths(z, d - 1, widths[:alive])
            exit_now = depth[:alive] == d
            if exit_now.any():
                lo = int(np.argmax(exit_now))  # the rows exiting here are the tail of the running prefix
                final[lo:alive] = z[lo:alive]
        out = torch.empty_like(final)
        out[torch.from_numpy(order)] = final
        return out


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    if len(images) == 0:
        raise ValueError("no images given")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a list must share one shape (C, H, W), got {sorted(shapes)}")
    return torch.stack(list(images))
