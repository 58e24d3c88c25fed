"""Compute-saving inference: each input runs at the setting its controller picked, for real.

For a batch: embed once (stem + the read's patch keys/values, shared by every setting), compute the controller's
observation from that (the cheap probe setting included), choose settings deterministically, group the batch by
setting and run each group with sliced FFN weights, its own number of latents and early exit; then put the
results back in input order. FLOPs per image = FLOPs(chosen setting) + the controller's overhead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from backbone.checkpoint import load_backbone
from backbone.evaluate import flops_grid
from envs import get_observation
from policy.controller import actor_flops, choose_actions, load_ppo
from policy.sidecar import check_compatible, grid_of, resolve_run


@dataclass
class Prediction:
    """Per-image results of :meth:`AdaptiveClassifier.predict`, in input order."""

    labels: torch.Tensor  # (B,) predicted class
    logits: torch.Tensor  # (B, classes)
    settings: list[tuple[int, int, int]]  # (tokens, depth, width) each image ran at
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
        self.flops_grid = flops_grid(backbone)
        c = backbone.cfg
        self.grid = (c.token_granularities, list(range(1, c.depth + 1)), c.widths)

    @classmethod
    def load(
        cls, run: str | os.PathLike, backbone: str | os.PathLike | None = None, device: str = "cpu"
    ) -> AdaptiveClassifier:
        """Load a run folder (or its ``policy.json``); refuse a backbone other than the one it was trained for."""
        zip_path, sidecar = resolve_run(run)
        model = load_backbone(backbone or sidecar["backbone_path"], device=device)
        check_compatible(sidecar, model.checkpoint_sha256, grid_of(model), sidecar["observation"])
        ppo = load_ppo(zip_path, device=device)
        return cls(model, ppo.policy, sidecar["observation"])

    def choose(self, memory) -> np.ndarray:
        """Setting indices ``(B, 3)`` for a batch already embedded by ``backbone.embed``."""
        return choose_actions(self.policy, self.spec.compute(self.backbone, memory))

    def setting(self, action: Sequence[int]) -> tuple[int, int, int]:
        k, d, m = (int(a) for a in action)
        return self.grid[0][k], self.grid[1][d], self.grid[2][m]

    @torch.no_grad()
    def predict(self, images: torch.Tensor | Sequence[torch.Tensor]) -> Prediction:
        """Classify ``images`` (float ``(B, C, H, W)`` in [0, 1], or a list of ``(C, H, W)``) adaptively."""
        x = _as_batch(images)
        memory = self.backbone.embed(x)
        actions = self.choose(memory)
        logits = torch.empty(len(x), self.backbone.cfg.num_classes, dtype=memory.tokens.dtype)
        unique, group_of = np.unique(actions, axis=0, return_inverse=True)
        for j, action in enumerate(unique):
            rows = torch.from_numpy(np.flatnonzero(group_of.reshape(-1) == j))
            g, d, w = self.setting(action)
            logits[rows] = self.backbone(memory[rows], num_tokens=g, depth=d, width=w)
        flops = self.flops_grid[actions[:, 0], actions[:, 1], actions[:, 2]] + self.controller_flops
        return Prediction(logits.argmax(-1), logits, [self.setting(a) for a in actions], actions, flops)


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    if len(images) == 0:
        raise ValueError("no images given")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a list must share one shape (C, H, W), got {sorted(shapes)}")
    return torch.stack(list(images))
