"""Score a deterministic controller on an outcome table and compare it with the fixed settings and the probe cascade."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from scipy.stats import binomtest

from backbone.pareto import front_accuracy_at
from backbone.settings import Setting
from envs import get_observation
from policy.cascade import OBSERVATION, fit_cascade, fit_cascade_to_accuracy


def setting_prices(model, spec, steps=None) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs of running each setting the way the controller runs it, the part of them its observation already did),
    both grid-shaped: what :func:`evaluate_actions` and compute-saving inference charge per image.

    One-shot (``steps`` None): the setting itself, less ``spec.reused_flops``. Sequential (``steps``, a
    :class:`~envs.sequential_steps.SequentialSteps`): the exit also pays every write-out it looked at and every
    decision, and a row on the probe's path also reuses the probe's write-out.
    """
    reused = spec.reused_flops(model)
    if steps is None:
        return model.grid.flops, reused
    return steps.spent_flops(), steps.reused_flops(reused, spec.continues_probe(model))


def evaluate_actions(
    table,
    actions: np.ndarray,
    controller_flops: int,
    reused_flops: np.ndarray | None = None,
    setting_flops: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of choosing ``actions[i]`` (a setting index of ``table.grid``) for sample ``i`` of ``table``.

    ``mean_flops`` includes the controller's overhead (observation features + actor network) and leaves out
    ``reused_flops[index]``, the part of a setting that the controller's probe already computed
    (``ObservationSpec.reused_flops``; adaptive inference continues from the probe instead of redoing it). The
    best fixed setting is the most accurate one whose FLOPs are <= that mean (the fixed setting pays no overhead).
    ``setting_flops`` (grid shape) prices an action when running it costs more than the setting itself (a sequential
    controller's exit also pays the write-outs it looked at and its decisions); default ``table.flops``.
    """
    actions = np.asarray(actions, dtype=np.int64)
    n = len(table.labels)
    ndim = table.grid.ndim
    if actions.shape != (n, ndim):
        raise ValueError(f"expected actions of shape ({n}, {ndim}), got {actions.shape}")
    index = tuple(actions.T)
    correct = table.correct[(np.arange(n), *index)]
    reused = np.zeros(table.flops.shape, np.int64) if reused_flops is None else np.asarray(reused_flops)
    if reused.shape != table.flops.shape:
        raise ValueError(f"reused_flops has shape {reused.shape}, the settings grid {table.flops.shape}")
    priced = table.flops if setting_flops is None else np.asarray(setting_flops)
    if priced.shape != table.flops.shape:
        raise ValueError(f"setting_flops has shape {priced.shape}, the settings grid {table.flops.shape}")
    backbone_flops = (priced[index] - reused[index]).astype(np.float64)
    mean_flops = float(backbone_flops.mean() + controller_flops)
    fixed_acc = table.correct.mean(0)  # grid.shape
    full = table.grid.full_index
    full_acc, full_flops = float(fixed_acc[full]), int(table.flops[full])
    best_fixed = front_accuracy_at(table.flops.ravel(), fixed_acc.ravel(), mean_flops)
    best_idx = _best_fixed_index(table.flops, fixed_acc, mean_flops)
    counts = Counter(str(s) for s in table.grid.settings(actions))
    accuracy = float(correct.mean())
    return {
        "samples": n,
        "accuracy": accuracy,
        "mean_flops": mean_flops,
        "backbone_mean_flops": float(backbone_flops.mean()),
        "controller_flops": int(controller_flops),
        "probe_reused_mean_flops": float(reused[index].mean()),
        "full_accuracy": full_acc,
        "full_flops": full_flops,
        "flops_saving": 1.0 - mean_flops / full_flops,
        "best_fixed_accuracy_at_same_flops": best_fixed,
        "best_fixed_setting_at_same_flops": None if best_idx is None else str(table.grid.setting(best_idx)),
        "vs_best_fixed_p_value": mcnemar_p(correct, table.correct[(slice(None), *best_idx)]) if best_idx else None,
        "distinct_settings": len(counts),
        "setting_counts": dict(counts.most_common()),
    }


def _best_fixed_index(flops: np.ndarray, acc: np.ndarray, budget: float) -> tuple[int, ...] | None:
    ok = flops <= budget
    if not ok.any():
        return None
    masked = np.where(ok, acc, -1.0)
    return tuple(int(i) for i in np.unravel_index(int(masked.argmax()), acc.shape))


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value of paired correctness vectors (is the accuracy difference real?)."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_gap(full: np.ndarray, controller: np.ndarray) -> dict[str, Any]:
    """How far a controller's accuracy lies under the full setting's on the same images, with its noise: the gap,
    a normal 95% interval of it from the per-image differences (paired: the images both get right or wrong add no
    noise), and McNemar's p. Says whether "within 0.1 points" is ruled out by the data or only missed by chance."""
    full, controller = np.asarray(full, dtype=bool), np.asarray(controller, dtype=bool)
    if full.shape != controller.shape or full.ndim != 1 or len(full) < 2:
        raise ValueError(f"need paired correctness vectors of one length >= 2, got {full.shape} and {controller.shape}")
    d = full.astype(np.float64) - controller
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return {"gap": float(d.mean()), "gap_ci95": [float(d.mean() - half), float(d.mean() + half)],
            "mcnemar_p_vs_full": mcnemar_p(full, controller)}  # fmt: skip


def format_report(metrics: dict[str, Any], top: int = 5) -> str:
    """The short table printed at the end of ``train_policy.py``."""
    m = metrics
    lines = [
        f"controller on {m.get('split', 'eval')} ({m['samples']} images)",
        f"  controller accuracy          {m['accuracy']:.2%}",
        f"  mean MFLOPs / image          {m['mean_flops'] / 1e6:.2f}  (backbone {m['backbone_mean_flops'] / 1e6:.2f}"
        f" + controller {m['controller_flops'] / 1e6:.3f}; {m['probe_reused_mean_flops'] / 1e6:.2f} of the backbone's"
        " work reused from the probe, not counted twice)",
        f"  saving vs full setting       {m['flops_saving']:.1%}",
        f"  full setting                 {m['full_accuracy']:.2%} at {m['full_flops'] / 1e6:.2f} MFLOPs",
        f"  best fixed at <= same FLOPs  {m['best_fixed_accuracy_at_same_flops']:.2%}"
        f"  ({m['best_fixed_setting_at_same_flops']}; McNemar p = {format_p(m['vs_best_fixed_p_value'], 3)})",
        f"  settings used                {m['distinct_settings']}; top {top} (tokens/depth/width):",
    ]
    for label, count in list(m["setting_counts"].items())[:top]:
        lines.append(f"    {label:>12}  {count / m['samples']:6.1%}")
    return "\n".join(lines)


def format_p(p: float | None, digits: int = 2) -> str:
    """A p-value for reports: ``digits`` significant digits, ``n/a`` where there was nothing to compare with."""
    return "n/a" if p is None else f"{p:.{digits}g}"


def validation_selected(table, val_acc: np.ndarray, actions: np.ndarray, budget: float) -> dict[str, Any]:
    """The fair front at ``budget``: the fixed setting best on the controllers' validation split (``val_acc``) among
    those that cheap, scored on ``table`` and compared with the choices ``actions`` by McNemar's test."""
    grid = table.grid
    ok = grid.flops <= budget
    if not ok.any():
        return {
            "validation_fixed_setting": None,
            "validation_fixed_accuracy": None,
            "vs_validation_fixed_p_value": None,
        }
    val_idx = tuple(int(i) for i in np.unravel_index(np.where(ok, val_acc, -1.0).argmax(), grid.shape))
    correct = table.correct[(np.arange(len(table)), *tuple(np.asarray(actions).T))]
    val_correct = table.correct[(slice(None), *val_idx)]
    return {
        "validation_fixed_setting": str(grid.setting(val_idx)),
        "validation_fixed_accuracy": float(val_correct.mean()),
        "vs_validation_fixed_p_value": mcnemar_p(correct, val_correct),
    }


ISO_TOLERANCE = 0.001 + 1e-12  # issue 20's iso-accuracy point: within 0.1 points of the full setting (inclusive)


def iso_check(row: dict, fixed: list[dict]) -> dict[str, Any]:
    """How far a controller (``accuracy``, ``mean_flops``) is from issue 20's iso-accuracy point on the same split:
    its gap to the full setting, its saving vs the full setting and vs the cheapest fixed setting at least as
    accurate, and whether it meets all three (within 0.1 points; >= 50% and >= 25% fewer FLOPs)."""
    full = max(fixed, key=lambda r: r["flops"])
    as_good = [f for f in fixed if f["accuracy"] >= row["accuracy"]]
    cheapest = min(as_good, key=lambda f: f["flops"]) if as_good else None
    vs_full = 1 - row["mean_flops"] / full["flops"]
    vs_cheapest = None if cheapest is None else 1 - row["mean_flops"] / cheapest["flops"]
    gap = full["accuracy"] - row["accuracy"]
    return {
        "gap_to_full": gap,
        "saving_vs_full": vs_full,
        "cheapest_fixed_as_accurate": None if cheapest is None else str(Setting.of_row(cheapest)),
        "saving_vs_cheapest_fixed_as_accurate": vs_cheapest,
        "meets_iso_accuracy": bool(
            gap <= ISO_TOLERANCE and vs_full >= 0.5 and (vs_cheapest is None or vs_cheapest >= 0.25)
        ),
    }


def iso_accuracy(controllers: list[dict], fixed: list[dict]) -> list[dict]:
    """Controllers within 0.1 points of the full setting, with :func:`iso_check`'s savings."""
    keys = ("controller", "flops_penalty", "seed", "accuracy", "mean_flops")
    checked = [({k: r[k] for k in keys}, iso_check(r, fixed)) for r in controllers]
    return [row | check for row, check in checked if check["gap_to_full"] <= ISO_TOLERANCE]


def choose_cascade(
    model, train, test, penalty: float | None = None, *, accuracy_drop: float | None = None
) -> dict[str, Any]:
    """The probe cascade (threshold and second setting) of highest mean reward ``accuracy - penalty * FLOPs /
    FLOPs(full)`` on ``train`` (policy-train, as a controller is chosen), or instead, given ``accuracy_drop``, the
    cheapest one within that much of the full setting's accuracy there (:func:`policy.cascade.fit_cascade_to_accuracy`);
    scored on ``test`` as a controller is (:func:`evaluate_actions`, whose figures ``metrics`` keeps for the baselines).
    """
    if (penalty is None) == (accuracy_drop is None):
        raise ValueError("fit the cascade by a FLOPs penalty or to an accuracy drop: give exactly one")
    if accuracy_drop is None:
        cascade, train_acc, train_flops = fit_cascade(model, train, penalty)
    else:
        cascade, train_acc, train_flops = fit_cascade_to_accuracy(model, train, accuracy_drop)
    spec = get_observation(OBSERVATION)
    actions = cascade.table_actions(test)
    metrics = evaluate_actions(test, actions, spec.flops(model), spec.reused_flops(model))
    return {
        "cascade": cascade,  # the fitted controller (train_policy.py --controller cascade saves it)
        "flops_penalty": penalty,  # None: fitted to accuracy_drop instead
        "accuracy_drop": accuracy_drop,  # None: fitted by the reward at flops_penalty
        "tau": cascade.tau,
        "setting": str(train.grid.setting(cascade.setting)),
        "train_accuracy": train_acc,
        "train_mean_flops": train_flops,
        "accuracy": metrics["accuracy"],
        "mean_flops": metrics["mean_flops"],
        "stopped_at_probe": float((actions == np.array(cascade.probe)).all(1).mean()),
        "outcome": test.correct[(np.arange(len(test)), *actions.T)],  # per test sample (McNemar against a controller)
        "actions": actions,  # per test sample: the setting it ran
        "metrics": metrics,
    }
