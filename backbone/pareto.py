"""Pareto front of (cost, accuracy) points: the points no cheaper-or-equal point beats."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_front(cost: Sequence[float] | np.ndarray, accuracy: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the front, cheapest first; accuracy strictly rises along it.

    A point is on the front when every point with cost <= its cost has lower accuracy (ties in cost keep the
    most accurate point only).
    """
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    order = np.lexsort((-accuracy, cost))  # by cost, then best accuracy first
    front, best = [], -np.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return np.asarray(front, dtype=int)


def front_accuracy_at(cost: np.ndarray, accuracy: np.ndarray, budget: float) -> float:
    """Best accuracy among points costing <= ``budget`` (NaN when none is that cheap)."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    ok = cost <= budget
    return float(accuracy[ok].max()) if ok.any() else float("nan")


def significant_steps(cost: Sequence[float], accuracy: Sequence[float], samples: int) -> np.ndarray:
    """Indices of a greedy chain along the front, cheapest first: each next point is more accurate than the last
    chosen one by more than its own standard error ``sqrt(p (1 - p) / samples)``.

    How many distinct accuracy levels the front offers at this sample size: a controller can only trade compute
    for accuracy where the front rises by more than the noise (issue 18 asks for >= 5 such steps).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    accuracy = np.asarray(accuracy, dtype=float)
    front = pareto_front(cost, accuracy)
    chain = [front[0]]
    for i in front[1:]:
        p = accuracy[i]
        if p - accuracy[chain[-1]] > np.sqrt(p * (1 - p) / samples):
            chain.append(i)
    return np.asarray(chain, dtype=int)


def cheapest_within(cost: Sequence[float], accuracy: Sequence[float], drop: float) -> int:
    """Index of the cheapest point at most ``drop`` below the most expensive point's accuracy: where the top of the
    front starts. A controller must undercut it to save compute at the full setting's accuracy (issue 20's
    iso-accuracy point compares against it); the flatter the top, the cheaper it is."""
    if drop < 0:
        raise ValueError(f"drop must be >= 0, got {drop}")
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    target = accuracy[np.argmax(cost)] - drop - 1e-12  # rounding: a point exactly `drop` below counts
    ok = np.flatnonzero(accuracy >= target)
    return int(ok[np.argmin(cost[ok])])
