"""Non-learned ways to spend compute per input, scored from per-sample outcome arrays ``(n, K, L, M)``.

* confidence early exit: run one (tokens, width) and stop at the first depth whose top-1 probability >= tau;
  every intermediate write-out (write cross-attention + head) is paid for;
* the probe cascade: answer with the probe (the cheapest setting, which the controller runs anyway) when its top-1
  probability >= tau, else run one other setting X, going on from the probe's work; the classic two-model cascade;
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


def probe_cascade(
    correct: np.ndarray,
    confidence: np.ndarray,
    flops: np.ndarray,
    reused: np.ndarray,
    overhead: int,
    taus: Sequence[float],
    probe: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean FLOPs of "the probe's answer if its top-1 probability >= tau, else setting X", for every
    threshold and every X: two arrays of shape ``(len(taus), *grid.shape)``.

    Args:
        correct, confidence: ``(n, *grid.shape)`` outcome arrays.
        flops: ``grid.shape`` FLOPs of each setting.
        reused: ``grid.shape`` FLOPs of each setting that the probe has already done (not done twice).
        overhead: FLOPs every image pays: the probe and its top-1 probability, beyond what every setting does anyway
            (``ObservationSpec.flops``); an image the probe answers also pays what its setting does beyond ``reused``
            (the shared embedding, on a backbone without stem exits), as the controller does.
        probe: grid index of the probe (the grid's smallest setting, :func:`envs.observations.probe_setting`).
    """
    n = correct.shape[0]
    conf, probe_ok = confidence[(slice(None), *probe)], correct[(slice(None), *probe)]
    extra = (flops - reused).astype(np.float64)
    acc = np.empty((len(taus), *flops.shape))
    cost = np.empty_like(acc)
    for i, tau in enumerate(taus):
        sure = conf >= tau
        acc[i] = (probe_ok[sure].sum() + correct[~sure].sum(0)) / n
        cost[i] = overhead + sure.mean() * extra[probe] + (~sure).mean() * extra
    return acc, cost


def cascade_outcome(
    correct: np.ndarray, confidence: np.ndarray, flops: np.ndarray, reused: np.ndarray, overhead: int,
    tau: float, setting: tuple[int, ...], probe: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per sample: (correct, FLOPs) of the probe cascade with threshold ``tau`` and second setting ``setting``: the
    image-by-image definition that the vectorised :func:`probe_cascade` and a fitted cascade are checked against."""
    sure = confidence[(slice(None), *probe)] >= tau
    ok = np.where(sure, correct[(slice(None), *probe)], correct[(slice(None), *setting)])
    cost = overhead + np.where(sure, float(flops[probe] - reused[probe]), float(flops[setting] - reused[setting]))
    return ok, cost


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

    def excess(beta: float) -> float:
        return float(probs(beta) @ f - budget)

    lo, hi = -200.0, 200.0  # widened until they bracket the budget: one just above the cheapest needs a large beta
    while excess(hi) > 0:
        hi *= 2
    while excess(lo) < 0:
        lo *= 2
    return probs(brentq(excess, lo, hi)).reshape(flops.shape)


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
