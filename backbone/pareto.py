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
