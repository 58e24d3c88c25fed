"""Compute-saving inference with a sequential controller: rows leave the block loop when their controller says stop.

For a batch: embed once and compute the one-shot observation (running the probe); the controller picks each
image's stage, tokens and width. Per (stage, tokens) group the latents are read once and go through the blocks
with widths mixed; after each block the running prediction is written out, its statistics become the step's
observation, and the rows the controller stops keep that prediction and leave the batch. Rows at the probe's stage,
tokens and width start from the probe's latents and logits (its read, block 1 and write-out are not redone).

FLOPs per image = ``SequentialSteps.spent_flops`` at the exit (every write-out looked at and every decision) - the
probe work it reused + the controller's observation and first decision.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from backbone.checkpoint import DEFAULT_BACKBONE, load_backbone
from backbone.prediction_stats import prediction_stats
from envs import SequentialSteps, get_observation
from envs.observations import observe_embed, run_probe
from envs.sequential_steps import STOP
from policy.adaptive import Prediction, _as_batch
from policy.controller import actor_flops, choose_actions, load_ppo
from policy.sidecar import check_compatible, resolve_run


class SequentialClassifier:
    """A frozen backbone plus the sequential controller trained for it."""

    def __init__(self, backbone, policy, observation: str, decision_flops: int) -> None:
        self.backbone = backbone.eval()
        self.policy = policy
        self.spec = get_observation(observation)
        self.observation = observation
        self.grid = backbone.grid
        self.steps = SequentialSteps.for_model(backbone, self.spec, decision_flops)
        self.controller_flops = self.spec.flops(backbone) + actor_flops(policy)  # observation + first decision
        self.continues_probe = self.spec.continues_probe(backbone)
        self.reused_flops = self.steps.reused_flops(self.spec.reused_flops(backbone), self.continues_probe)
        self.spent_flops = self.steps.spent_flops()

    @classmethod
    def load(
        cls, run: str | os.PathLike, backbone: str | os.PathLike | None = None, device: str = "cpu"
    ) -> SequentialClassifier:
        """Load a sequential run folder; refuse a one-shot controller or a backbone other than its own."""
        zip_path, sidecar = resolve_run(run)
        if sidecar.get("controller", "oneshot") != "sequential":
            raise ValueError(f"{run} holds a {sidecar.get('controller', 'oneshot')} controller, not a sequential one")
        model = load_backbone(backbone or sidecar.get("backbone_path") or DEFAULT_BACKBONE, device=device)
        check_compatible(sidecar, model.checkpoint_sha256, model.grid, sidecar["observation"])
        return cls(model, load_ppo(zip_path, device=device).policy, sidecar["observation"], sidecar["decision_flops"])

    def _decide(self, obs: np.ndarray) -> np.ndarray:
        return choose_actions(self.policy, obs)

    @torch.no_grad()
    def predict(self, images: torch.Tensor | list[torch.Tensor]) -> Prediction:
        """Classify ``images`` (float ``(B, C, H, W)`` in [0, 1], or a list of ``(C, H, W)``) step by step."""
        model, steps = self.backbone, self.steps
        x = _as_batch(images)
        memory = observe_embed(model, x)
        probe = run_probe(model, memory) if self.spec.probe else None
        base = self.spec.compute(model, memory, None if probe is None else probe[1]).cpu().numpy()
        choice = self._decide(steps.first(base))[:, :-1].astype(np.int64)
        n = len(x)
        at_depth1 = self.grid.values(np.stack(steps.setting_index(choice, np.ones(n, np.int64)), axis=1))
        cont = self.continues_probe[steps.setting_index(choice, np.ones(n, np.int64))]
        stages = at_depth1.stage if at_depth1.stage is not None else np.full(n, memory.stage)
        logits = memory.tokens.new_empty(n, model.cfg.num_classes)
        depth = np.zeros(n, np.int64)
        for stage in np.unique(stages).tolist():
            in_stage = np.flatnonzero(stages == stage)
            deeper = stage != memory.stage
            mem = model.continue_embed(memory[torch.from_numpy(in_stage)], stage) if deeper else memory
            for g in np.unique(at_depth1.tokens[in_stage]).tolist():
                rows = in_stage[at_depth1.tokens[in_stage] == g]
                local = np.searchsorted(in_stage, rows) if deeper else rows  # rows of `mem`
                z = memory.tokens.new_empty(len(rows), g, model.cfg.embed_dim)
                first = memory.tokens.new_empty(len(rows), model.cfg.num_classes)
                c = cont[rows]
                if c.any():  # the probe's latents after block 1 and its prediction
                    z[c], first[c] = probe[0][rows[c]], probe[1][rows[c]]
                if not c.all():
                    fresh = model.read_latents(mem[torch.from_numpy(local[~c])], g)
                    z[~c] = model.forward_block_mixed_widths(fresh, 0, at_depth1.width[rows[~c]])
                    first[~c] = model.forward_head(z[~c])
                self._run_group(rows, z, first, base, choice, at_depth1.width, logits, depth)
        actions = np.stack(steps.setting_index(choice, depth), axis=1)
        index = tuple(actions.T)
        flops = self.spent_flops[index] - self.reused_flops[index] + self.controller_flops
        return Prediction(logits.argmax(-1), logits, self.grid.settings(actions), actions, flops)

    def _run_group(self, rows, z, running_logits, base, choice, widths, logits_out, depth_out) -> None:
        """Blocks 2.. for one (stage, tokens) group, each row leaving when the controller stops it."""
        model, steps = self.backbone, self.steps
        last = len(self.grid.depths)
        previous: tuple[np.ndarray, np.ndarray] | None = None
        for d in range(1, last + 1):
            stop = np.ones(len(rows), bool)
            if d < last:
                stats = prediction_stats(running_logits).cpu().numpy()
                pred = running_logits.argmax(-1).cpu().numpy()
                obs = steps.after_block(base[rows], choice[rows], np.full(len(rows), d), stats,
                                        None if previous is None else previous[0],
                                        None if previous is None else previous[1] == pred)  # fmt: skip
                stop = self._decide(obs)[:, -1] == STOP
                previous = (stats[~stop], pred[~stop])
            logits_out[rows[stop]] = running_logits[torch.from_numpy(stop)]
            depth_out[rows[stop]] = d
            go = torch.from_numpy(~stop)
            rows, z = rows[~stop], z[go]
            if len(rows) == 0:
                return
            z = model.forward_block_mixed_widths(z, d, widths[rows])
            running_logits = model.forward_head(z)
