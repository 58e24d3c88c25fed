"""What the sequential controller sees and pays at each step of an episode (one definition for the environment,
the table rollout that scores a trained controller and compute-saving inference).

An episode: at step 0 the controller sees the image's cheap observation and picks every axis but depth (input
stage, tokens, width); block 1 runs and the prediction is written out. After block ``d`` it sees that running
prediction and says stop (exit with it) or go on (run block ``d + 1``); after the last block it must stop.

Observation ``(F + 2 + sum(choice sizes) + 5,)``: the one-shot observation, then ``[first step, d / L]``, one-hot of
each chosen index (zeros at step 0), then the running prediction's top-1 probability, top-1 - top-2 margin, entropy
(nats), whether its class agrees with the previous exit's, and the change in top-1 probability since then (the last
two 0 after block 1).

What an exit at depth ``d`` costs, beyond the one-shot controller's observation and first decision: the setting's
FLOPs (one write-out included), the ``d - 1`` earlier write-outs it looked at, and per decision the prediction
statistics plus the decision network (``min(d, L - 1)`` decisions: none is needed after the last block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backbone.flops import flops_breakdown
from backbone.model import AdaPerceiver
from backbone.prediction_stats import stats_flops
from backbone.settings import SettingsGrid

STOP, GO_ON = 1, 0  # the last action component after step 0
STEP_FEATURES = ("first_step", "depth_fraction")
PREDICTION_FEATURES = ("top1_prob", "margin", "entropy", "agrees_with_previous", "top1_change")


@dataclass(frozen=True, eq=False)
class SequentialSteps:
    """Observation layout and per-exit FLOPs of the sequential episode for one backbone and observation spec."""

    grid: SettingsGrid
    base_low: np.ndarray  # (F,) bounds of the one-shot observation
    base_high: np.ndarray
    exit_flops: np.ndarray  # (K,) one write-out (write cross-attention + head) at each token count
    num_classes: int
    decision_flops: int  # the decision network's FLOPs per decision (the actor path; 0 if not known yet)

    @classmethod
    def for_model(cls, model: AdaPerceiver, spec, decision_flops: int = 0) -> SequentialSteps:
        cfg = model.cfg
        exits = []
        for g in cfg.token_granularities:
            parts = flops_breakdown(cfg, g, 1, cfg.widths[0], cfg.stages[-1])
            exits.append(parts["write"] + parts["head"])
        return cls(model.grid, spec.low(model), spec.high(model), np.array(exits, np.int64), cfg.num_classes,
                   int(decision_flops))  # fmt: skip

    # --- actions -----------------------------------------------------------------------------------------------
    @property
    def depth_axis(self) -> int:
        return self.grid.axis("depth")

    @property
    def choice_shape(self) -> tuple[int, ...]:
        """Sizes of the axes chosen at step 0: every grid axis but depth."""
        return tuple(n for a, n in enumerate(self.grid.shape) if a != self.depth_axis)

    @property
    def action_nvec(self) -> tuple[int, ...]:
        """``MultiDiscrete`` sizes: the step-0 choice, then stop/go on (each step reads its own part)."""
        return (*self.choice_shape, 2)

    def setting_index(self, choice: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, ...]:
        """Grid index arrays of choices ``(B, len(choice_shape))`` exited after ``depth`` ``(B,)`` blocks."""
        cols = [choice[:, i] for i in range(choice.shape[1])]
        cols.insert(self.depth_axis, np.asarray(depth) - 1)
        return tuple(np.asarray(c, np.int64) for c in cols)

    # --- observations ------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.base_low) + len(STEP_FEATURES) + sum(self.choice_shape) + len(PREDICTION_FEATURES)

    def low(self) -> np.ndarray:
        extra = np.zeros(len(STEP_FEATURES) + sum(self.choice_shape) + len(PREDICTION_FEATURES), np.float32)
        extra[-1] = -1.0  # the top-1 change
        return np.concatenate([self.base_low, extra]).astype(np.float32)

    def high(self) -> np.ndarray:
        extra = np.ones(len(STEP_FEATURES) + sum(self.choice_shape) + len(PREDICTION_FEATURES), np.float32)
        extra[-3] = np.float32(math.log(self.num_classes))  # entropy
        return np.concatenate([self.base_high, extra]).astype(np.float32)

    def first(self, base: np.ndarray) -> np.ndarray:
        """Step-0 observations ``(B, dim)`` from one-shot observations ``(B, F)``."""
        out = np.zeros((len(base), self.dim), np.float32)
        out[:, : base.shape[1]] = base
        out[:, base.shape[1]] = 1.0
        return out

    def after_block(
        self,
        base: np.ndarray,
        choice: np.ndarray,
        depth: np.ndarray,
        stats: np.ndarray,
        previous: np.ndarray | None = None,
        agrees: np.ndarray | None = None,
    ) -> np.ndarray:
        """Observations ``(B, dim)`` after ``depth`` blocks: ``stats`` ``(B, 3)`` of the running prediction,
        ``previous`` those of the exit before it and ``agrees`` whether the two predicted the same class (both
        None after block 1)."""
        b, f = base.shape
        out = np.zeros((b, self.dim), np.float32)
        out[:, :f] = base
        out[:, f + 1] = np.asarray(depth, np.float32) / len(self.grid.depths)
        at = f + len(STEP_FEATURES)
        for i, n in enumerate(self.choice_shape):
            out[np.arange(b), at + choice[:, i]] = 1.0
            at += n
        out[:, at : at + 3] = stats
        if previous is not None:
            out[:, at + 3] = np.asarray(agrees, np.float32)
            out[:, at + 4] = np.clip(stats[:, 0] - previous[:, 0], -1.0, 1.0)
        return out

    # --- compute -----------------------------------------------------------------------------------------------
    def decisions(self, depth: np.ndarray | int) -> np.ndarray:
        """Stop/go-on decisions made by an episode that exits after ``depth`` blocks."""
        return np.minimum(depth, len(self.grid.depths) - 1)

    def spent_flops(self) -> np.ndarray:
        """FLOPs of exiting at each setting (grid shape), beyond the controller's observation and first decision."""
        grid, depth = self.grid, self._depths()
        shape = [1] * grid.ndim
        shape[grid.axis("tokens")] = -1
        exits = self.exit_flops.reshape(shape)
        per_decision = self.decision_flops + stats_flops(self.num_classes)
        return grid.flops + (depth - 1) * exits + self.decisions(depth) * per_decision

    def _depths(self) -> np.ndarray:
        """Blocks run at each depth index, shaped to broadcast over the grid."""
        shape = [-1 if a == self.depth_axis else 1 for a in range(self.grid.ndim)]
        return np.arange(1, len(self.grid.depths) + 1).reshape(shape)

    def reused_flops(self, reused: np.ndarray, continues_probe: np.ndarray) -> np.ndarray:
        """The one-shot ``ObservationSpec.reused_flops`` plus the probe's write-out: a row that continues the probe
        (its stage, tokens and width) takes the probe's prediction as its first look, so past depth 1 that write-out
        is not run again either (at depth 1 the one-shot count already has it)."""
        return reused + (continues_probe & (self._depths() > 1)) * self.exit_flops[0]
