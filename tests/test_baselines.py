"""policy.baselines against hand-made tables and brute-force loops over the raw per-sample arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policy.baselines import cascade_outcome, early_exit, matched_distribution, oracle, probe_cascade, random_matched


def random_outcomes(seed: int, n: int = 50, shape: tuple[int, int, int] = (2, 4, 3)):
    rng = np.random.default_rng(seed)
    correct = rng.random((n, *shape)) < 0.4
    confidence = (rng.integers(0, 5, (n, *shape)) / 4).astype(np.float32)  # exact quarters: ties with tau
    flops = rng.permutation(np.arange(1, np.prod(shape) + 1) * 1000).reshape(shape).astype(np.int64)
    return correct, confidence, flops


# --- oracle --------------------------------------------------------------------------------------------------------


def test_oracle_on_a_hand_made_table() -> None:
    flops = np.array([[[10], [30]], [[20], [40]]])  # (K=2, L=2, M=1)
    correct = np.zeros((4, 2, 2, 1), bool)
    correct[0, 1, 1, 0] = correct[0, 0, 1, 0] = True  # cheapest correct: 30
    correct[1, 0, 0, 0] = True  # 10
    correct[2, 1, 0, 0] = correct[2, 1, 1, 0] = True  # 20
    # image 3: nothing correct -> pays the full (most expensive) setting, 40
    assert oracle(correct, flops) == {"accuracy": 0.75, "mean_flops": (30 + 10 + 20 + 40) / 4}


@pytest.mark.parametrize("seed", range(5))
def test_oracle_equals_brute_force_minimum(seed: int) -> None:
    correct, _, flops = random_outcomes(seed)
    correct[:5] = False  # some images no setting gets right
    costs, hits = [], 0
    for i in range(len(correct)):
        options = [flops[s] for s in np.ndindex(flops.shape) if correct[i][s]]
        costs.append(min(options) if options else flops.max())
        hits += bool(options)
    got = oracle(correct, flops)
    assert got["accuracy"] == hits / len(correct)
    assert got["mean_flops"] == pytest.approx(np.mean(costs), rel=1e-12)


# --- confidence early exit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_early_exit_equals_brute_force_walk(seed: int) -> None:
    correct, confidence, flops = random_outcomes(seed)
    exit_cost = [7, 11]
    taus = [0.0, 0.25, 0.5, 0.6, 1.0, 1.5]  # 0: always at depth 1; 1.5: never confident, runs every block
    for k in range(flops.shape[0]):
        for m in range(flops.shape[2]):
            rows = early_exit(correct, confidence, flops, exit_cost[k], taus, (k, slice(None), m))
            assert [r["tau"] for r in rows] == taus
            for tau, row in zip(taus, rows, strict=True):
                hits, costs = 0, []
                for i in range(len(correct)):
                    depth = flops.shape[1] - 1
                    for d in range(flops.shape[1]):
                        if confidence[i, k, d, m] >= tau:
                            depth = d
                            break
                    hits += bool(correct[i, k, depth, m])
                    costs.append(flops[k, depth, m] + depth * exit_cost[k])  # one extra write-out per block passed
                assert row["accuracy"] == hits / len(correct), (k, m, tau)
                assert row["mean_flops"] == pytest.approx(np.mean(costs), rel=1e-12), (k, m, tau)


def test_early_exit_extremes_are_the_fixed_settings() -> None:
    correct, confidence, flops = random_outcomes(0)
    first, last = early_exit(correct, confidence, flops, 5, [0.0, 2.0], (1, slice(None), 2))
    assert first["accuracy"] == correct[:, 1, 0, 2].mean() and first["mean_flops"] == flops[1, 0, 2]
    depth = flops.shape[1]
    assert last["accuracy"] == correct[:, 1, -1, 2].mean()
    assert last["mean_flops"] == flops[1, -1, 2] + (depth - 1) * 5


# --- probe cascade -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_probe_cascade_equals_brute_force(seed: int) -> None:
    correct, confidence, flops = random_outcomes(seed)
    reused = np.zeros_like(flops)
    reused[0, :, 0] = flops[0, 0, 0] - 5  # settings going on from the probe skip its work, all but a shared 5
    overhead = int(flops[0, 0, 0]) - 5 + 3
    taus = [0.0, 0.25, 0.5, 1.0, 1.5]  # 0: the probe answers every image; 1.5: never
    acc, cost = probe_cascade(correct, confidence, flops, reused, overhead, taus, (0, 0, 0))
    assert acc.shape == cost.shape == (len(taus), *flops.shape)
    for t, tau in enumerate(taus):
        for x in np.ndindex(flops.shape):
            hits, costs = 0, []
            for i in range(len(correct)):
                if confidence[i, 0, 0, 0] >= tau:  # the probe is sure: its answer, and the shared part it skipped
                    hits += bool(correct[i, 0, 0, 0])
                    costs.append(overhead + 5)
                else:
                    hits += bool(correct[(i, *x)])
                    costs.append(overhead + flops[x] - reused[x])
            assert acc[(t, *x)] == hits / len(correct), (tau, x)
            assert cost[(t, *x)] == pytest.approx(np.mean(costs), rel=1e-12), (tau, x)
            ok, spent = cascade_outcome(correct, confidence, flops, reused, overhead, tau, x, (0, 0, 0))
            assert ok.mean() == acc[(t, *x)] and spent.mean() == pytest.approx(cost[(t, *x)], rel=1e-12)
    # never sure: every image runs X (the fixed setting, plus the probe's overhead less what X reuses)
    assert acc[-1] == pytest.approx(correct.mean(0))
    assert cost[-1] == pytest.approx(overhead + flops - reused)


# --- random settings at a matched budget ---------------------------------------------------------------------------


def test_matched_distribution_spends_the_budget_at_maximum_entropy() -> None:
    flops = np.array([[[100, 300]], [[200, 700]]], dtype=np.int64)
    for budget in [150.0, 325.0, 650.0]:
        p = matched_distribution(flops, budget)
        assert p.shape == flops.shape and np.all(p > 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert (p * flops).sum() == pytest.approx(budget, rel=1e-9)
        # maximum entropy at a fixed mean: log p is affine in the FLOPs (one beta for every setting)
        f, logp = flops.ravel().astype(float), np.log(p.ravel())
        slopes = (logp[1:] - logp[0]) / (f[1:] - f[0])
        assert slopes == pytest.approx([slopes[0]] * len(slopes), rel=1e-6)
        assert (slopes[0] < 0) == (budget < f.mean())  # below the uniform mean, cheaper settings are likelier
    for budget in [50.0, 100.0, 700.0, 800.0]:
        assert matched_distribution(flops, budget) is None
        assert random_matched(np.ones((3, 2, 1, 2), bool), flops, budget) is None
    # a budget a hair above the cheapest (or below the dearest) setting, next to a close second, needs a |beta|
    # far beyond the first bracket (the ablation met one: a probe cascade that answered almost every image)
    close = np.array([[[100, 101]], [[10_000, 20_000]]], dtype=np.int64)
    for budget in [100.01, 19_999.0]:
        assert (matched_distribution(close, budget) * close).sum() == pytest.approx(budget, rel=1e-9)


def test_random_matched_scores_its_draws() -> None:
    rng = np.random.default_rng(0)
    flops = np.array([[[100, 300]], [[200, 700]]], dtype=np.int64)
    n = 20_000
    correct = rng.random((n, *flops.shape)) < np.array([0.2, 0.5, 0.7, 0.9]).reshape(flops.shape)
    budget = 250.0  # below the uniform mean (325): a uniform draw would overspend
    result = random_matched(correct, flops, budget, seed=3)
    p = matched_distribution(flops, budget).ravel()
    per_setting = [correct[(slice(None), *s)].mean() for s in np.ndindex(flops.shape)]
    assert result["seed"] == 3
    assert result["expected_accuracy"] == pytest.approx(sum(pi * a for pi, a in zip(p, per_setting, strict=True)))
    # one draw per image: the realised figures sit within 5 standard errors of their expectations
    sd_flops = math.sqrt(p @ (flops.ravel() - budget) ** 2 / n)
    assert abs(result["mean_flops"] - budget) < 5 * sd_flops
    acc = result["expected_accuracy"]
    assert abs(result["accuracy"] - acc) < 5 * math.sqrt(acc * (1 - acc) / n)
    assert random_matched(correct, flops, budget, seed=3) == result
    assert random_matched(correct, flops, budget, seed=4)["mean_flops"] != result["mean_flops"]
