"""Score a sequential controller on an outcome table: every sample's episode, played deterministically at once.

The table holds every depth's prediction, so the episodes of all samples run as array lookups: the controller
picks (stage, tokens, width) for everyone, then after each block the rows still running see their prediction's
statistics and stop or go on. The result is each sample's exit setting, which the one-shot evaluation then
scores with the sequential episode's FLOPs (``policy.evaluation.setting_prices``: write-outs and decisions included).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from envs.sequential_steps import STOP, SequentialSteps

Decide = Callable[[np.ndarray], np.ndarray]  # observations (B, dim) -> actions (B, len(action_nvec))


def rollout(table, steps: SequentialSteps, decide: Decide) -> np.ndarray:
    """Exit setting indices ``(n, grid.ndim)`` of every sample of ``table`` under the controller ``decide``."""
    n, last = len(table), len(steps.grid.depths)
    choice = decide(steps.first(table.obs))[:, :-1].astype(np.int64)
    depth = np.ones(n, np.int64)
    running = np.arange(n)
    previous_stats = np.zeros((n, 3), np.float32)
    previous_pred = np.zeros(n, np.int64)
    for d in range(1, last):
        at = (running, *steps.setting_index(choice[running], np.full(len(running), d)))
        stats = np.stack([table.confidence[at], table.margin[at], table.entropy[at]], axis=1)
        pred = table.pred[at].astype(np.int64)
        first = d == 1
        obs = steps.after_block(
            table.obs[running],
            choice[running],
            np.full(len(running), d),
            stats,
            None if first else previous_stats[running],
            None if first else previous_pred[running] == pred,
        )
        stop = decide(obs)[:, -1] == STOP
        previous_stats[running], previous_pred[running] = stats, pred
        running = running[~stop]
        depth[running] = d + 1
        if len(running) == 0:
            break
    return np.stack(steps.setting_index(choice, depth), axis=1)
