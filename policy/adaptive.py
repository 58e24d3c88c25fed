"""Compute-saving inference: each input runs at the setting its controller picked, for real.

For a batch: embed once (the probe stage's patch tokens, shared by every setting of that stage; deeper stages continue
its stem, and reads of many latents project keys/values only for their own rows), compute the controller's
observation from that (running the cheap probe setting), choose settings deterministically, then read once per
(stage, tokens) and run the blocks once per token count, the rows of every stage and width together, with early
exit: rows are sorted deepest first, so after each block the rows whose chosen depth is reached are written out and
the rest carry on as a shorter prefix of the batch (at most K groups, not one per setting; each block's MLP half
runs once per width present). Rows with the probe's stage, tokens and width continue from the probe's latents
instead of redoing its read and first block. Results go back in input order. FLOPs per image = FLOPs(chosen
setting) - the probe work it reused + the controller's overhead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from backbone.checkpoint import DEFAULT_BACKBONE, load_backbone
from backbone.model import width_groups
from backbone.settings import Setting
from envs import get_observation
from policy.cascade import OBSERVATION as CASCADE_OBSERVATION
from policy.cascade import ProbeCascade, load_cascade
from policy.controller import actor_flops, choose_actions, load_ppo
from policy.sidecar import check_compatible, resolve_run


@dataclass
class Prediction:
    """Per-image results of :meth:`AdaptiveClassifier.predict`, in input order."""

    labels: torch.Tensor  # (B,) predicted class
    logits: torch.Tensor  # (B, classes)
    settings: list[Setting]  # (tokens, depth, width[, stage]) each image ran at
    actions: np.ndarray  # (B, grid.ndim) grid indices of those settings
    flops: np.ndarray  # (B,) FLOPs per image, controller overhead included


class AdaptiveClassifier:
    """A frozen backbone plus the controller fitted for it: a one-shot PPO policy or a :class:`ProbeCascade`."""

    def __init__(self, backbone, policy, observation: str, controller_flops: int | None = None) -> None:
        self.backbone = backbone.eval()
        self.policy = policy
        self.spec = get_observation(observation)
        self.observation = observation
        cascade = isinstance(policy, ProbeCascade)
        smallest = backbone.grid.index(backbone.grid.smallest)
        if cascade and (observation != CASCADE_OBSERVATION or policy.probe != smallest):
            raise ValueError(f"a probe cascade needs observation 'probe' and the grid's smallest setting as its probe, "
                             f"got {observation!r} and {list(policy.probe)}")  # fmt: skip
        self._decide = policy if cascade else lambda obs: choose_actions(policy, obs)
        decision_flops = 0 if cascade else actor_flops(policy)  # a cascade's one comparison, like the argmax: 0
        self.controller_flops = (
            controller_flops if controller_flops is not None else self.spec.flops(backbone) + decision_flops
        )
        self.grid = backbone.grid
        self.hidden_dim = backbone.cfg.hidden_dim  # FFN width -> MLP hidden units
        self.reused_flops = self.spec.reused_flops(backbone)  # observation work a setting goes on from
        self.continues_probe = self.spec.continues_probe(backbone)  # settings that start from the probe's latents

    @classmethod
    def load(
        cls, run: str | os.PathLike, backbone: str | os.PathLike | None = None, device: str = "cpu"
    ) -> AdaptiveClassifier:
        """Load a run folder (or its ``policy.json``); refuse a backbone other than the one it was trained for."""
        path, sidecar = resolve_run(run)
        kind = sidecar.get("controller", "oneshot")
        if kind not in ("oneshot", "cascade"):
            raise ValueError(f"{run} holds a {kind} controller; load it with policy.load_classifier")
        model = load_backbone(backbone or sidecar.get("backbone_path") or DEFAULT_BACKBONE, device=device)
        check_compatible(sidecar, model.checkpoint_sha256, model.grid, sidecar["observation"])
        if kind == "cascade":
            return cls(model, load_cascade(path, model.grid.shape), sidecar["observation"])
        return cls(model, load_ppo(path, device=device).policy, sidecar["observation"])

    def choose(self, memory, probe_logits: torch.Tensor | None = None) -> np.ndarray:
        """Setting indices ``(B, grid.ndim)`` for a batch embedded by :func:`envs.observations.observe_embed`."""
        return self._decide(self.spec.compute(self.backbone, memory, probe_logits))

    @torch.no_grad()
    def front(self, images: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
        """What every image pays before its setting runs: the probe stage's embedding, the probe and the controller's
        choice. Returns ``(memory, probe latents and logits or None, setting indices)`` for the setting to go on from;
        its time alone bounds the speed-up (``policy.benchmark``)."""
        memory, probe = self.spec.embed_and_probe(self.backbone, _as_batch(images))
        return memory, probe, self.choose(memory, None if probe is None else probe[1])

    @torch.no_grad()
    def predict(self, images: torch.Tensor | Sequence[torch.Tensor]) -> Prediction:
        """Classify ``images`` (float ``(B, C, H, W)`` in [0, 1], or a list of ``(C, H, W)``) adaptively."""
        model = self.backbone
        memory, probe, actions = self.front(images)
        n = len(actions)
        index = tuple(actions.T)
        setting = self.grid.values(actions)
        logits = memory.tokens.new_empty(n, model.cfg.num_classes)
        # rows whose setting continues from the probe's latents (its stage, tokens and width) skip its read and
        # block 1; the spec that says which also prices them, so execution and accounting cannot drift apart
        cont = self.continues_probe[index]
        at_probe = cont & (setting.depth == 1)
        if at_probe.any():
            logits[at_probe] = probe[1][at_probe]
        stages = setting.stage if setting.stage is not None else np.full(n, memory.stage)
        starts: dict[int, list[tuple[np.ndarray, torch.Tensor]]] = {}  # tokens -> (rows, latents before block 1)
        for stage in np.unique(stages).tolist():
            in_stage = np.flatnonzero((stages == stage) & ~at_probe)
            if len(in_stage) == 0:
                continue
            # one stem continuation per deeper stage: from the probe stage's feature map, nothing redone
            deeper = stage != memory.stage
            mem = model.continue_embed(memory, stage, torch.from_numpy(in_stage)) if deeper else memory
            for g in np.unique(setting.tokens[in_stage]).tolist():  # one read per (stage, tokens)
                rows = in_stage[setting.tokens[in_stage] == g]
                local = np.searchsorted(in_stage, rows) if deeper else rows  # rows of `mem`
                start = memory.tokens.new_empty(len(rows), g, model.cfg.embed_dim)
                c = cont[rows]
                if c.any():
                    start[c] = probe[0][rows[c]]
                if not c.all():
                    start[~c] = model.read_latents(mem[torch.from_numpy(local[~c])], g)
                starts.setdefault(g, []).append((rows, start))
        # one pass through the blocks and one write-out per token count, every stage's rows together (after the
        # read the blocks do not depend on the stage): fewer, larger groups of small operators
        for parts in starts.values():
            rows = np.concatenate([r for r, _ in parts])
            start = parts[0][1] if len(parts) == 1 else torch.cat([z for _, z in parts])
            final = self._run_blocks(start, setting.depth[rows], setting.width[rows], cont[rows])
            logits[rows] = model.forward_head(final)
        flops = self.grid.flops_of(actions) - self.reused_flops[index] + self.controller_flops
        return Prediction(logits.argmax(-1), logits, self.grid.settings(actions), actions, flops)

    def _run_blocks(
        self, latents: torch.Tensor, depth: np.ndarray, widths: np.ndarray, past_block1: np.ndarray
    ) -> torch.Tensor:
        """Each row through blocks ``1..depth[i]`` at ``widths[i]`` (rows with ``past_block1`` skip block 1); the
        latents each row exits with, in input order.

        Rows are sorted deepest first, so the rows still running are always a prefix: each block runs once, on
        exactly the rows that need it (early exit without masking or wasted rows). Its attention half runs once on
        the whole prefix, whatever the widths; its MLP half once per width on that width's rows of the prefix.
        """
        model = self.backbone
        order = np.argsort(-depth, kind="stable")
        identity = bool((order == np.arange(len(order))).all())
        z = latents if identity else latents[torch.from_numpy(order)]
        depth, widths, past_block1 = depth[order], widths[order], past_block1[order]
        final = torch.empty_like(z) if depth[-1] < depth[0] else None  # None: all exit after the last block
        for d in range(1, int(depth[0]) + 1):
            alive = int(np.count_nonzero(depth >= d))
            z = z[:alive]
            todo = np.flatnonzero(~past_block1[:alive]) if d == 1 else None  # rows that still need block 1
            if todo is None or len(todo) == alive:
                z = model.forward_block_grouped_unchecked(z, d - 1, width_groups(widths[:alive], self.hidden_dim))
            elif len(todo):
                rows = torch.from_numpy(todo)
                z[rows] = model.forward_block_grouped_unchecked(z[rows], 0, width_groups(widths[todo], self.hidden_dim))
            if final is not None and depth[alive - 1] == d:
                lo = int(np.argmax(depth[:alive] == d))  # the rows exiting here are the tail of the running prefix
                final[lo:alive] = z[lo:alive]
        out = z if final is None else final
        if identity:
            return out
        unsorted = torch.empty_like(out)
        unsorted[torch.from_numpy(order)] = out
        return unsorted


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    if len(images) == 0:
        raise ValueError("no images given")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a list must share one shape (C, H, W), got {sorted(shapes)}")
    return torch.stack(list(images))
