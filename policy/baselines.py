"""Non-learned ways to spend compute per input, scored from per-sample outcome arrays ``(n, K, L, M)``.

* confidence early exit: run one (tokens, width) and stop at the first depth whose top-1 probability >= tau;
  every intermediate write-out (write cross-attention + head) is paid for;
* random settings whose expected FLOPs match a budget;
* the oracle: the cheapest correct setting of each image (the full setting when none is correct).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import brentq


def early_exit(
    correct: np.ndarray,
    confidence: np.ndarray,
    flops: np.ndarray,
    exit_cost: int,
    taus: Sequence[float],
    path: tuple[int | slice, ...],
) -> list[dict]:
    """Accuracy and mean FLOPs of confidence early exit along one depth path, for each threshold ``tau``.

    Args:
        correct, confidence: ``(n, *grid.shape)`` outcome arrays.
        flops: ``grid.shape`` FLOPs of each setting (one write-out included).
        exit_cost: FLOPs of one extra write-out (write + head) at the path's token count.
        taus: thresholds on the top-1 probability.
        path: an index of the grid with ``slice(None)`` on the depth axis and fixed values on the others, e.g.
            ``(k, slice(None), m)``: the (tokens, width) the depth axis is walked at.
    """
    conf = confidence[(slice(None), *path)]  # (n, L)
    ok = correct[(slice(None), *path)]
    cost_at = flops[path]  # (L,)
    n, depth = conf.shape
    rows = []
    for tau in taus:
        hit = conf >= tau
        exit_at = np.where(hit.any(1), hit.argmax(1), depth - 1)  # 0-based depth index
        cost = cost_at[exit_at] + exit_at * exit_cost
        rows.append(
            {"tau": float(tau), "accuracy": float(ok[np.arange(n), exit_at].mean()), "mean_flops": float(cost.mean())}
        )
    return rows


def oracle(correct: np.ndarray, flops: np.ndarray) -> dict:
    """Cheapest correct setting per image; the full setting when no setting is correct."""
    n = correct.shape[0]
    flat_correct = correct.reshape(n, -1)
    cost = np.where(flat_correct, flops.reshape(1, -1), np.inf).min(1)
    any_correct = np.isfinite(cost)
    cost = np.where(any_correct, cost, flops.max())
    return {"accuracy": float(any_correct.mean()), "mean_flops": float(cost.mean())}


def matched_distribution(flops: np.ndarray, budget: float) -> np.ndarray | None:
    """Distribution ``p ∝ exp(-beta * flops / max)`` over settings with expected FLOPs = ``budget``.

    The maximum-entropy distribution at that mean cost: as random as possible while spending the budget.
    None when the budget is outside [cheapest, most expensive].
    """
    f = flops.ravel().astype(np.float64)
    if not f.min() < budget < f.max():
        return None
    x = f / f.max()

    def probs(beta: float) -> np.ndarray:
        z = np.exp(-beta * (x - x.min()))
        return z / z.sum()

    beta = brentq(lambda b: probs(b) @ f - budget, -200.0, 200.0)
    return probs(beta).reshape(flops.shape)


def random_matched(correct: np.ndarray, flops: np.ndarray, budget: float, seed: int = 0) -> dict | None:
    """Draw one random setting per image from :func:`matched_distribution`; score it."""
    p = matched_distribution(flops, budget)
    if p is None:
        return None
    n = correct.shape[0]
    rng = np.random.default_rng(seed)
    choice = rng.choice(p.size, size=n, p=p.ravel())
    flat_correct = correct.reshape(n, -1)
    return {
        "accuracy": float(flat_correct[np.arange(n), choice].mean()),
        "expected_accuracy": float(p.ravel() @ flat_correct.mean(0)),
        "mean_flops": float(flops.ravel()[choice].mean()),
        "seed": seed,
    }
