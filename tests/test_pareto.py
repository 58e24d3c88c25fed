"""backbone.pareto against brute-force O(n^2) references on random points with many ties in cost and accuracy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from backbone.evaluate import write_report
from backbone.pareto import cheapest_within, front_accuracy_at, pareto_front, significant_steps


def brute_force_front(cost: np.ndarray, accuracy: np.ndarray) -> list[int]:
    """Point ``i`` is on the front when no other point is cheaper-or-equal and at least as accurate.

    Exact duplicates (same cost, same accuracy) keep the lowest index only; the result is sorted cheapest first.
    """
    front = []
    for i in range(len(cost)):
        beaten = False
        for j in range(len(cost)):
            if j == i or cost[j] > cost[i] or accuracy[j] < accuracy[i]:
                continue
            if cost[j] < cost[i] or accuracy[j] > accuracy[i] or j < i:
                beaten = True
                break
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: cost[i])


def brute_force_accuracy_at(cost: np.ndarray, accuracy: np.ndarray, budget: float) -> float:
    best = -math.inf
    for c, a in zip(cost, accuracy, strict=True):
        if c <= budget and a > best:
            best = a
    return float(best) if best > -math.inf else float("nan")


@pytest.mark.parametrize("seed", range(30))
def test_front_equals_brute_force_on_random_points(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    cost = rng.integers(1, 12, n).astype(float)  # few distinct values: many ties in cost
    accuracy = rng.integers(0, 8, n) / 8  # and in accuracy, exact duplicates included
    front = pareto_front(cost, accuracy)
    assert front.tolist() == brute_force_front(cost, accuracy)
    assert np.all(np.diff(cost[front]) > 0) and np.all(np.diff(accuracy[front]) > 0)


def test_front_on_a_hand_made_table() -> None:
    cost = [5, 1, 3, 3, 2, 4, 1, 6]
    accuracy = [0.9, 0.5, 0.7, 0.8, 0.5, 0.8, 0.4, 0.9]
    # 1 beats 6 (same cost, more accurate) and 4 (cheaper, as accurate); 3 beats 2; 3 beats 5; 0 beats 7
    assert pareto_front(cost, accuracy).tolist() == [1, 3, 0]


@pytest.mark.parametrize("seed", range(10))
def test_front_accuracy_at_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 30))
    cost = rng.integers(1, 12, n).astype(float)
    accuracy = rng.random(n)
    front = pareto_front(cost, accuracy)
    for budget in [0.5, *np.unique(cost), 5.5, 100.0]:
        got, want = front_accuracy_at(cost, accuracy, budget), brute_force_accuracy_at(cost, accuracy, budget)
        if math.isnan(want):
            assert math.isnan(got), budget
            continue
        assert got == want, budget
        # the best point within a budget is the last front point within it
        assert got == accuracy[front[cost[front] <= budget][-1]]


def test_significant_steps_on_a_hand_made_front() -> None:
    """n = 10,000: the standard error at p = 0.9 is 0.3 points, at 0.8 0.4 points."""
    cost = [1, 2, 3, 4, 5, 6, 7]
    accuracy = [0.800, 0.803, 0.8035, 0.900, 0.902, 0.904, 0.890]
    # 0.803 and 0.8035 are within 0.4 points of 0.800; 0.900 is a step; 0.902 is not; 0.904 is (> 0.29 above 0.900)
    assert significant_steps(cost, accuracy, 10_000).tolist() == [0, 3, 5]
    assert significant_steps(cost, accuracy, 100).tolist() == [0, 3]  # fewer images: only the big step counts
    with pytest.raises(ValueError, match="samples must be >= 1"):
        significant_steps(cost, accuracy, 0)


def test_cheapest_within_finds_where_the_top_starts() -> None:
    cost = [1, 2, 3, 4, 5, 10]
    accuracy = [0.80, 0.895, 0.899, 0.905, 0.90, 0.900]  # the full setting (cost 10) is not the most accurate
    assert cheapest_within(cost, accuracy, 0.001) == 2  # 0.899 is exactly 0.1 points under 0.900: it counts
    assert cheapest_within(cost, accuracy, 0.0) == 3  # at least as accurate as the full setting: 0.905
    assert cheapest_within(cost, accuracy, 0.005) == 1
    assert cheapest_within(cost, accuracy, 0.2) == 0
    with pytest.raises(ValueError, match="drop must be >= 0"):
        cheapest_within(cost, accuracy, -0.001)


def test_evaluate_report_states_where_the_top_starts(tmp_path) -> None:
    rows = [
        {"tokens": 2, "depth": 1, "width": 16, "stage": s, "flops": f, "accuracy": a, "pareto": p}
        for s, f, a, p in [(0, 1e6, 0.85, True), (1, 2e6, 0.8995, True), (2, 5e6, 0.902, True), (3, 1e8, 0.9, False)]
    ]
    meta = {"checkpoint": "x.safetensors", "sha256": "0" * 64, "split": "test", "samples": 10_000, "command": "c"}
    paths = write_report(rows, meta, tmp_path, "eval_test")
    front = json.loads(paths["json"].read_text())["front"]
    assert front["top_start"] == "s1/2/1/16" and front["top_start_flops_share"] == pytest.approx(0.02)
    assert "the top of the front starts at s1/2/1/16" in paths["md"].read_text()
