"""Compute-saving inference with a sequential controller: rows leave the block loop when their controller says stop.

For a batch: embed once and compute the one-shot observation (running the probe); the controller picks each
image's stage, tokens and width. Per (stage, tokens) the latents are read once, then each token count's rows (every
stage and width) go through the blocks as one batch, each block's attention half once and its MLP half once per
width; after each block the running predictions are written out, their statistics become the step's observations
(one decision call for every running row), and the rows the controller stops keep that prediction and leave the
batch. Rows at the probe's stage,
tokens and width start from the probe's latents and logits (its read, block 1 and write-out are not redone).

FLOPs per image = ``SequentialSteps.spent_flops`` at the exit (every write-out looked at and every decision) - the
probe work it reused + the controller's observation and first decision.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from backbone.checkpoint import DEFAULT_BACKBONE, load_backbone
from backbone.model import width_groups
from backbone.prediction_stats import prediction_stats
from envs import SequentialSteps, get_observation
from envs.sequential_steps import STOP
from policy.adaptive import Prediction, _as_batch
from policy.controller import actor_flops, choose_actions, load_ppo
from policy.evaluation import setting_prices
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
        self.spent_flops, self.reused_flops = setting_prices(backbone, self.spec, self.steps)

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
    def front(self, images: torch.Tensor | list[torch.Tensor]) -> tuple:
        """What every image pays before its first block runs: the probe stage's embedding, the probe and the first
        decision (stage, tokens, width). Returns ``(memory, probe or None, observation, choice)``; its time alone
        bounds the speed-up (``policy.benchmark``)."""
        memory, probe = self.spec.embed_and_probe(self.backbone, _as_batch(images))
        base = self.spec.compute(self.backbone, memory, None if probe is None else probe[1]).cpu().numpy()
        return memory, probe, base, self._decide(self.steps.first(base))[:, :-1].astype(np.int64)

    @torch.no_grad()
    def predict(self, images: torch.Tensor | list[torch.Tensor]) -> Prediction:
        """Classify ``images`` (float ``(B, C, H, W)`` in [0, 1], or a list of ``(C, H, W)``) step by step."""
        model, steps, hidden = self.backbone, self.steps, self.backbone.cfg.hidden_dim
        memory, probe, base, choice = self.front(images)
        n = len(choice)
        first = steps.setting_index(choice, np.ones(n, np.int64))
        at_depth1 = self.grid.values(np.stack(first, axis=1))
        cont = self.continues_probe[first]
        stages = at_depth1.stage if at_depth1.stage is not None else np.full(n, memory.stage)
        parts: dict[int, list] = {}  # tokens -> [(rows, latents after block 1, logits after block 1), ...]
        for stage in np.unique(stages).tolist():
            in_stage = np.flatnonzero(stages == stage)
            deeper = stage != memory.stage  # continue the stem from the probe stage's feature map, those rows only
            mem = model.continue_embed(memory, stage, torch.from_numpy(in_stage)) if deeper else memory
            for g in np.unique(at_depth1.tokens[in_stage]).tolist():
                of_g = in_stage[at_depth1.tokens[in_stage] == g]
                on_probe = of_g[cont[of_g]]  # rows on the probe's path take its latents and prediction
                if len(on_probe):
                    at = torch.from_numpy(on_probe)
                    parts.setdefault(g, []).append((on_probe, probe[0][at], probe[1][at]))
                fresh = of_g[~cont[of_g]]
                if len(fresh):
                    local = np.searchsorted(in_stage, fresh) if deeper else fresh  # rows of `mem`
                    read = model.read_latents(mem[torch.from_numpy(local)], g)  # one read per (stage, tokens)
                    z = model.forward_block_grouped_unchecked(read, 0, width_groups(at_depth1.width[fresh], hidden))
                    parts.setdefault(g, []).append((fresh, z, model.forward_head(z)))
        # one group per token count, every stage and width together: (rows, latents, logits, widths)
        groups = []
        for ps in parts.values():
            rows = np.concatenate([p[0] for p in ps])
            groups.append((rows, torch.cat([p[1] for p in ps]), torch.cat([p[2] for p in ps]), at_depth1.width[rows]))
        logits = memory.tokens.new_empty(n, model.cfg.num_classes)
        depth = self._exit_steps(groups, base, choice, logits)
        actions = np.stack(steps.setting_index(choice, depth), axis=1)
        index = tuple(actions.T)
        flops = self.spent_flops[index] - self.reused_flops[index] + self.controller_flops
        return Prediction(logits.argmax(-1), logits, self.grid.settings(actions), actions, flops)

    def _exit_steps(self, groups: list, base: np.ndarray, choice: np.ndarray, logits_out: torch.Tensor) -> np.ndarray:
        """Blocks 2.. of every group; after each block one decision for every running row. Returns exit depths."""
        model, steps, hidden = self.backbone, self.steps, self.backbone.cfg.hidden_dim
        last = len(self.grid.depths)
        depth = np.zeros(len(base), np.int64)
        previous_stats = np.zeros((len(base), 3), np.float32)
        previous_pred = np.zeros(len(base), np.int64)
        for d in range(1, last + 1):
            rows = np.concatenate([g[0] for g in groups])
            running = torch.cat([g[2] for g in groups])
            if d < last:
                stats = prediction_stats(running).cpu().numpy()
                pred = running.argmax(-1).cpu().numpy()
                obs = steps.after_block(base[rows], choice[rows], np.full(len(rows), d), stats,
                                        None if d == 1 else previous_stats[rows],
                                        None if d == 1 else previous_pred[rows] == pred)  # fmt: skip
                stop = self._decide(obs)[:, -1] == STOP
                previous_stats[rows], previous_pred[rows] = stats, pred
            else:
                stop = np.ones(len(rows), bool)
            logits_out[torch.from_numpy(rows[stop])] = running[torch.from_numpy(stop)]
            depth[rows[stop]] = d
            going, at = [], 0
            for g_rows, z, _, widths in groups:
                go = ~stop[at : at + len(g_rows)]
                at += len(g_rows)
                if go.any():
                    z = model.forward_block_grouped_unchecked(
                        z[torch.from_numpy(go)], d, width_groups(widths[go], hidden)
                    )
                    going.append((g_rows[go], z, model.forward_head(z), widths[go]))
            groups = going
            if not groups:
                break
        return depth
