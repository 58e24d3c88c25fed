"""Gymnasium environment: spend a frozen AdaPerceiver's compute on one image step by step (DESIGN §5, issue 20).

The one-shot environment asks for the whole setting up front. Here the controller picks the input stage, tokens
and width from the cheap observation, then watches the prediction after every block and decides when to stop:
early exit learned with the FLOPs it costs, which is what RL's credit assignment over steps is for.
"""

from __future__ import annotations

import os
from typing import Any, SupportsFloat

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from backbone.model import AdaPerceiver
from backbone.prediction_stats import prediction_stats
from envs.compute_env import AdaPerceiverComputeEnv, _eval_mode
from envs.sequential_steps import STOP, SequentialSteps


class AdaPerceiverSequentialEnv(AdaPerceiverComputeEnv):
    """Choose (stage, tokens, width) for one image, then after each block whether to stop.

    ## Action Space

    ``MultiDiscrete([(S,) K, M, 2])``. At step 0 the leading indices pick the input stage (with stem exits),
    token count and FFN width (the last component is ignored); block 1 then runs. At every later step only the
    last component counts: ``1`` stops and classifies with the running prediction, ``0`` runs the next block.
    After the last block the episode ends whatever the action.

    ## Observation Space

    ``Box`` of :class:`~envs.sequential_steps.SequentialSteps` (``env.steps``): the one-shot observation, a step
    indicator and depth fraction, one-hots of the chosen indices and the running prediction's statistics.

    ## Rewards

    With gamma = 1 an episode's return is ``correct - flops_penalty * FLOPs spent / FLOPs(full setting)``:
    each step pays for the compute it triggers (the block, the write-out looked at, the decision) and the stop
    adds ``correct`` (``-cross-entropy`` with ``reward="neg_ce"``). FLOPs spent are
    ``SequentialSteps.spent_flops`` (the one-shot observation's cost is the controller's, as in the one-shot
    environment, and not part of the reward).

    ## Episode End

    ``terminated`` at the stop (or after the last block). ``info`` then holds the setting exited at, ``flops``
    (spent), ``correct``, ``pred``, ``label`` and ``sample_index``.

    ## Arguments

    Those of :class:`~envs.compute_env.AdaPerceiverComputeEnv`, plus ``decision_flops``: the decision network's
    FLOPs per decision, charged at every stop/go-on step (the trainer passes its actor's; default 0).
    ``mode="live"`` runs the backbone block by block and gives the same rewards as the table.
    """

    def __init__(
        self, backbone: str | os.PathLike | AdaPerceiver | None = None, *args: Any, decision_flops: int = 0, **kwargs
    ) -> None:
        super().__init__(backbone, *args, **kwargs)
        if isinstance(decision_flops, bool) or not isinstance(decision_flops, (int, np.integer)) or decision_flops < 0:
            raise ValueError(f"decision_flops must be an integer >= 0, got {decision_flops!r}")
        self.steps = SequentialSteps.for_model(self.model, self.observation_spec, int(decision_flops))
        self.action_space = spaces.MultiDiscrete(list(self.steps.action_nvec))
        self.observation_space = spaces.Box(self.steps.low(), self.steps.high(), dtype=np.float32)
        self._spent = self.steps.spent_flops()  # grid shape
        self._relative_spent = self.flops_penalty * self._spent / float(self.grid.full_flops)
        self._last = len(self.grid.depths)
        self._depth_axis = self.steps.depth_axis
        self._choice: tuple[int, ...] | None = None
        self._depth = 0

    # --- the running prediction --------------------------------------------------------------------------------
    def _setting_at(self, depth: int) -> tuple[int, ...]:
        """Grid index of the episode's choice exited after ``depth`` blocks (the hot path: plain tuples)."""
        return (*self._choice[: self._depth_axis], depth - 1, *self._choice[self._depth_axis :])

    def _look(self, depth: int) -> tuple[np.ndarray, int, bool, float]:
        """(stats (3,), pred, correct, cross-entropy) of the prediction after ``depth`` blocks."""
        i, index = self._sample, self._setting_at(depth)
        if self.mode == "table":
            t, at = self.table, (i, *index)
            stats = np.array([t.confidence[at], t.margin[at], t.entropy[at]], np.float32)
            return stats, int(t.pred[at]), bool(t.correct[at]), float(t.loss[at])
        model, setting = self.model, self.grid.setting(index)
        with _eval_mode(model):
            if depth == 1:  # continue the stem to the chosen stage (if deeper), read, first block
                stage = setting.stage
                memory = self._memory if stage is None else model.continue_embed(self._memory, stage)
                self._latents = model.read_latents(memory, setting.tokens)
            self._latents = model.forward_blocks(self._latents, depth - 1, depth, setting.width)
            logits = model.forward_head(self._latents).float()
            ce = float(F.cross_entropy(logits, torch.tensor([self._labels_list[i]])))
        pred = int(logits[0].argmax())
        return prediction_stats(logits)[0].numpy(), pred, pred == self._labels_list[i], ce

    def _advance(self, depth: int) -> tuple[np.ndarray, float]:
        """Run to ``depth`` blocks; the observation there and the reward for the compute it took."""
        stats, pred, correct, ce = self._look(depth)
        previous = self._seen
        self._seen = (stats, pred, correct, ce)
        self._depth = depth
        spent_now = self._relative_spent[self._setting_at(depth)]
        spent_before = self._relative_spent[self._setting_at(depth - 1)] if depth > 1 else 0.0
        obs = self.steps.after_block(
            self._base[None],
            np.array([self._choice]),
            np.array([depth]),
            stats[None],
            None if previous is None else previous[0][None],
            None if previous is None else np.array([previous[1] == pred]),
        )[0]
        return obs, -float(spent_now - spent_before)

    # --- Gymnasium API -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        base, info = super().reset(seed=seed, options=options)
        self._sample, self._base = self._index, base  # the base class keeps the episode's sample in _index
        self._choice, self._depth, self._seen = None, 0, None
        return self.steps.first(base[None])[0], info

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        if getattr(self, "_sample", -1) < 0:
            raise RuntimeError("call reset() before step(): the episode is over or has not started")
        action = self._parse_sequential(action)
        if self._choice is None:  # step 0: the setting's other axes; block 1 runs
            self._choice = tuple(int(a) for a in action[:-1])
            obs, reward = self._advance(1)
            stop = self._last == 1
        else:
            stop = int(action[-1]) == STOP
            obs, reward = (self._obs_now, 0.0) if stop else self._advance(self._depth + 1)
            stop = stop or self._depth == self._last
        self._obs_now = obs
        if not stop:
            return obs.copy(), reward, False, False, {}
        _, pred, correct, ce = self._seen
        reward += float(correct) if self.reward_type == "correct" else -ce
        index = self._setting_at(self._depth)
        setting = self.grid.setting(index)
        info = {
            **{k: v for k, v in setting._asdict().items() if v is not None},
            "flops": int(self._spent[index]),
            "correct": correct,
            "pred": pred,
            "label": self._labels_list[self._sample],
            "sample_index": self._sample,
        }
        self._sample, self._index, self._choice = -1, -1, None
        return obs.copy(), reward, True, False, info

    def _parse_sequential(self, action: Any) -> np.ndarray:
        nvec = self.steps.action_nvec
        arr = np.asarray(action.detach().cpu().numpy() if isinstance(action, torch.Tensor) else action)
        if arr.shape != (len(nvec),) or arr.dtype.kind not in "iu" or not ((arr >= 0) & (arr < nvec)).all():
            raise ValueError(f"action must be {len(nvec)} integers within MultiDiscrete({list(nvec)}), got {action!r}")
        return arr
