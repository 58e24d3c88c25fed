"""Where do controllers sit? Every fixed setting, confidence early exit, random, oracle and controllers.

    python -m policy.ablation [--penalties 0.003 0.01 0.03 0.1 0.3 1] [--controllers oneshot sequential]
                              [--policies RUN ...] [--seeds 0 1 2] [--out FOLDER]

Controllers not given with --policies are trained with the same code as ``train_policy.py`` (into
``--runs-dir``; a finished run there is reused). Everything is scored on the test split's outcome table and
written as ``ablation.json``, ``ablation.md``, ``pareto.png`` and ``compute_allocation.png`` (where the compute
goes: FLOPs per class and against the probe's confidence).

Two fixed-setting fronts are reported: the test front (the best test accuracy at <= the controller's FLOPs, a
max over hundreds of noisy estimates, so biased upwards) and the validation-selected front (the setting that is
best on the controllers' own policy-train split, scored on test), the fair one: a controller is also chosen
without seeing test. Confidence early exit is the envelope over every (stage, tokens, width) path and threshold.
The probe cascade (answer with the probe when its top-1 probability >= tau, else run one setting X) is chosen per
penalty on policy-train, like a controller, by the same reward, and compared with the controller of that penalty.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from backbone.data import FASHION_MNIST_CLASSES, DataError
from backbone.fileio import atomic_write, write_json
from backbone.flops import flops_breakdown
from backbone.interrupt import EXIT_INTERRUPTED
from backbone.option_checks import int_at_least
from backbone.pareto import front_accuracy_at, pareto_front
from backbone.settings import Setting
from envs import SequentialSteps, get_observation
from policy.baselines import early_exit, oracle, random_matched
from policy.config import DEFAULT_POLICY_CONFIG, PPO_CONTROLLERS, build_policy_config, check_penalties
from policy.controller import load_ppo
from policy.evaluation import (
    choose_cascade,
    evaluate_actions,
    format_p,
    iso_accuracy,
    iso_check,
    mcnemar_p,
    paired_gap,
    setting_prices,
    validation_selected,
)
from policy.report_cli import add_table_options
from policy.sidecar import check_compatible, resolve_run
from policy.training import controller_actions, load_backbone_for, outcome_table, train_controller

TAUS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.01)


def find_or_train(
    cfg_kwargs: dict,
    penalty: float,
    given: dict[tuple, Path],
    runs_dir: Path,
    seed: int,
    task: str = "fmnist",
    controller: str = "oneshot",
) -> Path:
    """A run folder for (controller, penalty, seed): one given with --policies, a finished one in runs_dir, or a
    new one."""
    if (controller, penalty, seed) in given:
        return given[(controller, penalty, seed)]
    kind = "" if controller == "oneshot" else f"{controller}__"
    run = runs_dir / f"{task}__{kind}p{penalty:g}__s{seed}"
    if (run / "eval.json").is_file():
        print(f"reusing controller {run}", file=sys.stderr)
        return run
    resume = str(run) if (run / "policy.zip").is_file() else None  # an interrupted earlier run is finished
    print(f"{'finishing' if resume else 'training'} controller for penalty {penalty:g} -> {run}", file=sys.stderr)
    cfg = build_policy_config(
        **{**cfg_kwargs, "flops_penalty": penalty, "seed": seed, "out": str(run), "controller": controller}
    )
    train_controller(cfg, resume=resume, progress=False)
    return run


def run_ablation(args: argparse.Namespace) -> dict[str, Any]:
    base = {
        "config_path": args.config,
        "backbone": args.backbone,
        "data": args.data,
        "data_dir": args.data_dir,
        "table_device": args.table_device,
        "table_batch_size": args.table_batch_size,
        "workers": args.workers,
        "timesteps": args.timesteps,
        "train_limit": args.train_limit,
        "eval_limit": args.eval_limit,
        "cache_dir": args.cache_dir,
    }
    cfg = build_policy_config(**base)
    given = {}
    for run in args.policies or []:
        _, side = resolve_run(run)
        if side.get("controller") == "cascade":
            raise ValueError(f"{run} is a probe cascade: the ablation fits its own for every penalty (--policies "
                             "takes PPO runs)")  # fmt: skip
        given[(side.get("controller", "oneshot"), float(side["flops_penalty"]), int(side["seed"]))] = Path(run)
    penalties = sorted(set(args.penalties) | {p for _, p, _ in given})
    if args.headline_penalty not in penalties:  # its extra seeds and the allocation plot would silently be missing
        raise ValueError(f"--headline-penalty {args.headline_penalty:g} is not one of the penalties "
                         f"{penalties}; add it to --penalties")  # fmt: skip
    model = load_backbone_for(cfg.backbone)
    table = outcome_table(model, cfg, cfg.eval_split, cfg.eval_limit)
    grid = table.grid
    acc = table.accuracy()
    flops = grid.flops
    fixed = grid.table(acc)
    early = early_exit_paths(model, table)
    early_front = envelope(early)
    train = outcome_table(model, cfg, cfg.train_split, cfg.train_limit)
    val_acc = train.accuracy()  # for the fair front

    cascades = {p: choose_cascade(model, train, table, p) for p in penalties}
    for c in cascades.values():  # the cascade controller (train_policy.py --controller cascade) against the baselines
        c.update(baselines_at(table, c["metrics"], c["actions"], val_acc, early_front, args.seed))
    # aimed at issue 20's iso-accuracy point: the cheapest cascade within --iso-drop of the full setting on
    # policy-train, chosen before test is looked at, then checked there like every controller
    iso_cascade = choose_cascade(model, train, table, accuracy_drop=args.iso_drop / 100)
    controllers = []
    for kind in args.controllers:
        for p in penalties:
            for seed in args.seeds if p == args.headline_penalty else args.seeds[:1]:
                run = find_or_train(base, p, given, Path(args.runs_dir), seed, cfg.task, kind)
                controllers.append(score_run(run, model, table, val_acc, early_front, args.seed, cascades))
    return {
        "backbone": str(model.checkpoint_path),
        "backbone_sha256": model.checkpoint_sha256,
        "data": cfg.task,
        "split": cfg.eval_split,
        "samples": len(table.labels),
        "observation": table.observation,
        "seed": args.seed,
        "classes": list(FASHION_MNIST_CLASSES) if cfg.task == "fmnist" else [],
        "command": "python -m policy.ablation " + " ".join(sys.argv[1:]),
        "fixed": fixed,
        "early_exit": early,
        "early_exit_envelope": early_front,
        "oracle": oracle(table.correct, flops),
        "probe_cascade": [_json_row(c) for c in cascades.values()],
        "controllers": controllers,
        "headline": headline(controllers, args.headline_penalty),
        "iso_accuracy": iso_accuracy(controllers, fixed),
        "iso_cascade": _json_row(iso_cascade)
        | iso_check(iso_cascade, fixed)
        | {
            "full_train_accuracy": float(val_acc[train.grid.full_index]),
            "paired_gap_to_full": paired_gap(table.correct[(slice(None), *grid.full_index)], iso_cascade["outcome"]),
        },
    }


def _gap_interval(cascade: dict[str, Any]) -> str:
    """`` (95% paired interval a..b points, McNemar p = ...)``: whether the data rule "within 0.1 points" out."""
    g = cascade["paired_gap_to_full"]
    lo, hi = (100 * v for v in g["gap_ci95"])
    return f" (95% paired interval {lo:.2f}..{hi:.2f} points, McNemar p = {format_p(g['mcnemar_p_vs_full'])})"


def _json_row(cascade: dict[str, Any]) -> dict[str, Any]:
    """A cascade's row without its per-sample arrays and object (kept in memory for McNemar only)."""
    return {k: v for k, v in cascade.items() if k not in ("cascade", "outcome", "actions", "metrics")}


def early_exit_paths(model, table) -> dict[str, list[dict]]:
    """Confidence early exit along every (stage, tokens, width) path, thresholds ``TAUS``, write-outs paid."""
    grid = table.grid
    depth_axis = grid.axis("depth")
    early = {}
    for index in np.ndindex(*grid.shape[:depth_axis], *grid.shape[depth_axis + 1 :]):  # every path along depth
        path = (*index[:depth_axis], slice(None), *index[depth_axis:])
        first = grid.setting(tuple(0 if isinstance(i, slice) else i for i in path))
        write = flops_breakdown(model.cfg, first.tokens, 1, first.width, first.stage)
        label = ("" if first.stage is None else f"s{first.stage}/") + f"{first.tokens}/{first.width}"
        early[label] = early_exit(table.correct, table.confidence, grid.flops, write["write"] + write["head"], TAUS,
                                  path)  # fmt: skip
    return early


def envelope(early: dict[str, list[dict]]) -> list[dict]:
    """The best early exit at each cost: the Pareto front of every path's (threshold) points."""
    points = [{**e, "path": label} for label, rows in early.items() for e in rows]
    front = pareto_front([e["mean_flops"] for e in points], [e["accuracy"] for e in points])  # cheapest first
    return [points[i] for i in front]


def score_run(
    run: Path, model, table, val_acc: np.ndarray, early_front: list[dict], seed: int, cascades: dict[float, dict]
) -> dict[str, Any]:
    """One controller on the test table, next to every baseline at its mean FLOPs and the probe cascade chosen for
    its penalty."""
    zip_path, side = resolve_run(run)
    check_compatible(side, model.checkpoint_sha256, model.grid, table.observation)
    policy = load_ppo(zip_path).policy
    kind = side.get("controller", "oneshot")
    spec = get_observation(side["observation"])
    steps = SequentialSteps.for_model(model, spec, side["decision_flops"]) if kind == "sequential" else None
    actions = controller_actions(policy, table, steps)
    index = tuple(actions.T)
    priced, reused = setting_prices(model, spec, steps)
    m = evaluate_actions(table, actions, side["controller_flops"], reused, priced)
    cost = (priced[index] - reused[index]).astype(np.float64) + m["controller_flops"]
    cascade = cascades[float(side["flops_penalty"])]
    correct = table.correct[(np.arange(len(table)), *index)]
    return {
        "run": str(run),
        "controller": kind,
        "flops_penalty": float(side["flops_penalty"]),
        "seed": int(side["seed"]),
        "accuracy": m["accuracy"],
        "mean_flops": m["mean_flops"],
        "controller_flops": m["controller_flops"],
        "distinct_settings": m["distinct_settings"],
        **baselines_at(table, m, actions, val_acc, early_front, seed),
        "cascade_accuracy": cascade["accuracy"],
        "cascade_mean_flops": cascade["mean_flops"],
        "vs_cascade_p_value": mcnemar_p(correct, cascade["outcome"]),
        "flops_per_image": _where_flops_go(table, cost, spec.probe),
        "top_settings": dict(list(m["setting_counts"].items())[:5]),
    }


def baselines_at(table, m: dict[str, Any], actions: np.ndarray, val_acc: np.ndarray, early_front: list[dict],
                 seed: int) -> dict[str, Any]:  # fmt: skip
    """A controller's test figures ``m`` (:func:`evaluate_actions` of its ``actions``) next to the baselines at its
    mean FLOPs: the test front (McNemar), the validation-selected setting (McNemar), early exit and random."""
    budget = m["mean_flops"]
    return {
        "front_accuracy_at_same_flops": m["best_fixed_accuracy_at_same_flops"],
        "on_or_above_front": bool(m["accuracy"] >= m["best_fixed_accuracy_at_same_flops"]),
        "best_fixed_setting_at_same_flops": m["best_fixed_setting_at_same_flops"],
        "vs_best_fixed_p_value": m["vs_best_fixed_p_value"],
        **validation_selected(table, val_acc, actions, budget),
        "early_exit_accuracy_at_same_flops": front_accuracy_at(
            [e["mean_flops"] for e in early_front], [e["accuracy"] for e in early_front], budget
        ),
        "random_matched": random_matched(table.correct, table.grid.flops, budget, seed=seed),
    }


def _where_flops_go(table, cost: np.ndarray, has_probe: bool) -> dict[str, list[float]]:
    """Mean FLOPs per image (``cost``, ``(n,)``) per class and per bin of the probe's top-1 probability."""
    by_class = [float(cost[table.labels == c].mean()) if (table.labels == c).any() else float("nan")
                for c in range(int(table.labels.max()) + 1)]  # fmt: skip
    out = {"by_class": by_class}
    if has_probe:
        conf = table.obs[:, -3]  # the probe's top-1 probability (last three features: top-1, margin, entropy)
        which = np.clip(np.digitize(conf, np.linspace(0.0, 1.0, 11)) - 1, 0, 9)
        out["by_probe_confidence"] = [float(cost[which == b].mean()) if (which == b).any() else float("nan")
                                      for b in range(10)]  # fmt: skip
        out["probe_confidence_images"] = [int((which == b).sum()) for b in range(10)]
    return out


def headline(controllers: list[dict], penalty: float) -> dict[str, Any]:
    """Mean and spread over seeds of each controller kind at the headline penalty."""
    out = {}
    for kind in PPO_CONTROLLERS:
        rows = [r for r in controllers if r["controller"] == kind and r["flops_penalty"] == penalty]
        if not rows:
            continue
        acc = np.array([r["accuracy"] for r in rows])
        fl = np.array([r["mean_flops"] for r in rows])
        out[kind] = {
            "penalty": penalty,
            "seeds": [r["seed"] for r in rows],
            "accuracy_mean": float(acc.mean()),
            "accuracy_sd": float(acc.std(ddof=1)) if len(rows) > 1 else 0.0,
            "mean_flops_mean": float(fl.mean()),
            "front_accuracy": [r["front_accuracy_at_same_flops"] for r in rows],
            "vs_best_fixed_p_value": [r["vs_best_fixed_p_value"] for r in rows],
            "above_front_all_seeds": all(r["on_or_above_front"] for r in rows),
        }
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def _baseline_cells(r: dict[str, Any]) -> str:
    """Markdown cells: test front | McNemar p | validation-selected (setting) | McNemar p | early exit."""
    return (
        f"{_pct(r['front_accuracy_at_same_flops'])} | {format_p(r['vs_best_fixed_p_value'])} | "
        f"{_pct(r['validation_fixed_accuracy'])} ({r['validation_fixed_setting']}) | "
        f"{format_p(r['vs_validation_fixed_p_value'])} | {_pct(r['early_exit_accuracy_at_same_flops'])}"
    )


def write_markdown(result: dict[str, Any], path: Path) -> None:
    full = max(result["fixed"], key=lambda r: r["flops"])
    fmt = lambda f: f"{f / 1e6:.2f}"  # noqa: E731
    pct = _pct
    lines = [
        f"# Ablation on `{result['split']}` ({result['samples']} images)",
        "",
        f"Command: `{result['command']}`  ",
        f"Backbone sha256 `{result['backbone_sha256'][:16]}...`, observation `{result['observation']}`, "
        f"random-baseline seed {result['seed']}. FLOPs per image; controllers include their own overhead (features, "
        "networks, and for the sequential one every write-out it looks at and every decision).",
        "",
        "Fronts at the controller's mean FLOPs: *test front* = best test accuracy of any fixed setting that cheap (a "
        "max over hundreds of noisy estimates, biased up); *validation-selected* = the fixed setting best on "
        "policy-train within the budget, scored on test (chosen the way a controller is: without test). *Early "
        "exit* = the envelope of confidence early exit over every (stage, tokens, width) path and threshold. *Probe "
        "cascade* = the probe's answer when its top-1 probability >= tau, else one setting X, with (tau, X) chosen "
        "on policy-train for the controller's penalty by the same reward (accuracy @ MFLOPs on test).",
        "",
        "## Controllers",
        "",
        "| controller | penalty | seed | accuracy | MFLOPs | saving vs full | test front | McNemar p | "
        "validation-selected fixed | McNemar p | early exit | probe cascade (same penalty) | McNemar p | "
        "random @ same FLOPs | settings |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["controllers"]:
        rand = r["random_matched"]
        lines.append(
            f"| {r['controller']} | {r['flops_penalty']:g} | {r['seed']} | {r['accuracy']:.2%} | "
            f"{fmt(r['mean_flops'])} | {1 - r['mean_flops'] / full['flops']:.1%} | {_baseline_cells(r)} | "
            f"{pct(r['cascade_accuracy'])} @ {fmt(r['cascade_mean_flops'])} | {format_p(r['vs_cascade_p_value'])} | "
            f"{pct(None if rand is None else rand['accuracy'])} | {r['distinct_settings']} |"
        )
    o = result["oracle"]
    lines += [
        "",
        f"Full setting: {full['accuracy']:.2%} at {fmt(full['flops'])} MFLOPs. "
        f"Oracle (cheapest correct setting): {o['accuracy']:.2%} at {fmt(o['mean_flops'])} MFLOPs.",
        "",
        "## Headline penalty over seeds",
        "",
        "| controller | penalty | seeds | accuracy (mean +- sd) | MFLOPs (mean) | test front per seed | McNemar p per "
        "seed | above the test front in every seed |",
        "|---|---:|---|---:|---:|---|---|:---:|",
    ]
    for kind, h in result["headline"].items():
        lines.append(
            f"| {kind} | {h['penalty']:g} | {', '.join(map(str, h['seeds']))} | {h['accuracy_mean']:.2%} +- "
            f"{h['accuracy_sd']:.2%} | {fmt(h['mean_flops_mean'])} | "
            f"{', '.join(pct(a) for a in h['front_accuracy'])} | "
            f"{', '.join(format_p(p) for p in h['vs_best_fixed_p_value'])} | "
            f"{'yes' if h['above_front_all_seeds'] else 'no'} |"
        )
    lines += ["", "## Probe cascade, chosen on policy-train for each penalty (`train_policy.py --controller cascade`)",
              "", "| penalty | tau | X | policy-train accuracy @ MFLOPs | test accuracy | MFLOPs | answered by the "
              "probe | test front | McNemar p | validation-selected fixed | McNemar p | early exit | "
              "random @ same FLOPs |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in result["probe_cascade"]:
        rand = c["random_matched"]
        lines.append(
            f"| {c['flops_penalty']:g} | {c['tau']:g} | {c['setting']} | {c['train_accuracy']:.2%} @ "
            f"{fmt(c['train_mean_flops'])} | {c['accuracy']:.2%} | {fmt(c['mean_flops'])} | "
            f"{c['stopped_at_probe']:.1%} | {_baseline_cells(c)} | "
            f"{pct(None if rand is None else rand['accuracy'])} |"
        )
    lines += ["", "## Iso-accuracy: controllers within 0.1 points of the full setting", ""]
    if result["iso_accuracy"]:
        lines += ["| controller | penalty | seed | accuracy | MFLOPs | saving vs full | cheapest fixed as accurate | "
                  "saving vs it |", "|---|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
        for r in result["iso_accuracy"]:
            sv = r["saving_vs_cheapest_fixed_as_accurate"]
            lines.append(
                f"| {r['controller']} | {r['flops_penalty']:g} | {r['seed']} | {r['accuracy']:.2%} | "
                f"{fmt(r['mean_flops'])} | {r['saving_vs_full']:.1%} | {r['cheapest_fixed_as_accurate'] or 'none'} | "
                f"{'n/a' if sv is None else format(sv, '.1%')} |"
            )
    else:
        lines.append("None of the controllers is within 0.1 points of the full setting.")
    if "iso_cascade" in result:
        c = result["iso_cascade"]
        sv = c["saving_vs_cheapest_fixed_as_accurate"]
        verdict = "**met**" if c["meets_iso_accuracy"] else "**not met**"
        lines += [
            "",
            f"The probe cascade aimed at that point: the cheapest (tau, X) within {100 * c['accuracy_drop']:g} points "
            f"of the full setting on policy-train (tau {c['tau']:g}, X {c['setting']}: {c['train_accuracy']:.2%} at "
            f"{fmt(c['train_mean_flops'])} MFLOPs there, the full setting {c['full_train_accuracy']:.2%}) gets "
            f"{c['accuracy']:.2%} at {fmt(c['mean_flops'])} MFLOPs here, {100 * c['gap_to_full']:.2f} points under "
            f"the full setting's {full['accuracy']:.2%}{_gap_interval(c)}, "
            f"{c['saving_vs_full']:.1%} fewer FLOPs than it and {'n/a' if sv is None else format(sv, '.1%')} fewer "
            f"than the cheapest fixed setting as accurate ({c['cheapest_fixed_as_accurate']}): iso-accuracy {verdict}.",
        ]
    lines += ["", "## Confidence early exit: the envelope over every path", "", "| path | tau | accuracy | MFLOPs |",
              "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {e['path']} | {e['tau']:g} | {e['accuracy']:.2%} | {fmt(e['mean_flops'])} |"
              for e in result["early_exit_envelope"]]  # fmt: skip
    lines += ["", "## Fixed-setting Pareto front", "", "| setting | MFLOPs | accuracy |", "|---|---:|---:|"]
    lines += [
        f"| {Setting.of_row(r)} | {fmt(r['flops'])} | {r['accuracy']:.2%} |"
        for r in sorted((r for r in result["fixed"] if r["pareto"]), key=lambda r: r["flops"])
    ]
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against mean FLOPs: the fixed settings and their front, early exit, random, oracle, controllers."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    fixed = result["fixed"]
    ax.scatter([r["flops"] / 1e6 for r in fixed], [100 * r["accuracy"] for r in fixed], s=8, c="0.75",
               label="fixed settings")  # fmt: skip
    front = sorted((r for r in fixed if r["pareto"]), key=lambda r: r["flops"])
    ax.step([r["flops"] / 1e6 for r in front], [100 * r["accuracy"] for r in front], where="post", c="k", lw=1,
            label="fixed-setting front (test)")  # fmt: skip
    ee = result["early_exit_envelope"]
    ax.step([e["mean_flops"] / 1e6 for e in ee], [100 * e["accuracy"] for e in ee], where="post", c="tab:blue",
            lw=1.2, label="confidence early exit (best path, tau swept)")  # fmt: skip
    cas = sorted(result["probe_cascade"], key=lambda c: c["mean_flops"])
    ax.plot([c["mean_flops"] / 1e6 for c in cas], [100 * c["accuracy"] for c in cas], marker="^", ms=5, c="tab:cyan",
            lw=1, label="probe cascade controller (tau, X fitted on policy-train per penalty)")  # fmt: skip
    o = result["oracle"]
    ax.scatter([o["mean_flops"] / 1e6], [100 * o["accuracy"]], marker="*", s=140, c="tab:green", label="oracle")
    ctrl = result["controllers"]
    rand = [r["random_matched"] for r in ctrl if r["random_matched"]]
    ax.scatter([r["mean_flops"] / 1e6 for r in rand], [100 * r["accuracy"] for r in rand], marker="x",
               c="tab:purple", label="random settings at matched FLOPs")  # fmt: skip
    for kind, color, marker in (("oneshot", "tab:red", "o"), ("sequential", "tab:orange", "s")):
        rows = sorted((r for r in ctrl if r["controller"] == kind), key=lambda r: r["mean_flops"])
        if not rows:
            continue
        ax.plot([r["mean_flops"] / 1e6 for r in rows], [100 * r["accuracy"] for r in rows], marker=marker, ms=6,
                c=color, lw=1, zorder=5, label=f"PPO {kind} controller (overhead included)")  # fmt: skip
        for r in rows:
            if r["seed"] == min(x["seed"] for x in rows):
                at = (r["mean_flops"] / 1e6, 100 * r["accuracy"])
                offset = (4, -9 if kind == "oneshot" else 5)
                ax.annotate(f"p={r['flops_penalty']:g}", at, fontsize=6, xytext=offset, textcoords="offset points",
                            color=color)  # fmt: skip
    ax.set_xscale("log")
    ys = [100 * r["accuracy"] for r in front] + [100 * r["accuracy"] for r in ctrl]
    ax.set_ylim(max(0, min(ys) - 2), min(100, max([*ys, 100 * o["accuracy"]]) + 1))
    ax.set_xlabel("mean MFLOPs per image (log scale)")
    ax.set_ylabel(f"top-1 accuracy on {result['split']} (%)")
    ax.set_title("Accuracy vs compute: controllers over the penalty sweep")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_allocation(result: dict[str, Any], path: Path, penalty: float, classes: list[str] | None = None) -> None:
    """Where the compute goes at ``penalty``: mean FLOPs per class, and against the probe's top-1 probability."""
    rows = {r["controller"]: r for r in result["controllers"] if r["flops_penalty"] == penalty and r["seed"] == 0}
    if not rows:
        return
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    n_classes = len(next(iter(rows.values()))["flops_per_image"]["by_class"])
    names = classes if classes and len(classes) == n_classes else [str(c) for c in range(n_classes)]
    width = 0.8 / len(rows)
    for i, (kind, r) in enumerate(sorted(rows.items())):
        f = r["flops_per_image"]
        left.bar(np.arange(n_classes) + i * width, np.array(f["by_class"]) / 1e6, width, label=kind)
        if "by_probe_confidence" in f:
            centers = np.linspace(0.05, 0.95, 10)
            keep = np.array(f["probe_confidence_images"]) > 0
            right.plot(centers[keep], np.array(f["by_probe_confidence"])[keep] / 1e6, "-o", ms=4, label=kind)
    left.set_xticks(np.arange(n_classes) + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=7)
    left.set_ylabel("mean MFLOPs per image")
    left.set_title(f"FLOPs per class (penalty {penalty:g})")
    left.legend(fontsize=7)
    right.set_xlabel("probe's top-1 probability (bins of 0.1)")
    right.set_ylabel("mean MFLOPs per image")
    right.set_title("FLOPs against the probe's confidence")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--penalties",
        type=float,
        nargs="+",
        default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        help="FLOPs penalties of the controllers to compare, spanning the front (default: 0.003 0.01 0.03 0.1 0.3 1)",
    )
    parser.add_argument(
        "--controllers",
        nargs="+",
        choices=list(PPO_CONTROLLERS),
        default=list(PPO_CONTROLLERS),
        help="PPO controller kinds to train and score at every penalty (default: both; the probe cascade is fitted "
        "for every penalty anyway)",
    )
    parser.add_argument(
        "--seeds",
        type=int_at_least(0),
        nargs="+",
        default=[0],
        help="controller seeds at the headline penalty (the first one at every other penalty); e.g. 0 1 2",
    )
    parser.add_argument("--headline-penalty", type=float, default=0.3, help="penalty whose row gets every seed")
    parser.add_argument(
        "--iso-drop",
        type=float,
        default=0.05,
        help="points of accuracy under the full setting (on policy-train) allowed to the probe cascade aimed at the "
        "iso-accuracy point: the cheapest cascade within that much is fitted and checked on test (default 0.05)",
    )
    parser.add_argument("--policies", nargs="*", help="existing run folders to use (their penalty is read from them)")
    parser.add_argument("--backbone", help="backbone .safetensors (default: the shipped checkpoint)")
    parser.add_argument("--config", default=str(DEFAULT_POLICY_CONFIG), help="PolicyConfig YAML for new controllers")
    parser.add_argument("--timesteps", type=int_at_least(1), help="PPO timesteps of newly trained controllers")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random baseline")
    parser.add_argument("--runs-dir", default="runs/ablation", help="where missing controllers are trained")
    parser.add_argument(
        "--out",
        help="folder for ablation.json, ablation.md, pareto.png, compute_allocation.png (default: a new "
        "RUNS_DIR/report__<time>)",
    )
    parser.add_argument("--table-device", help="torch device of the backbone while outcome tables are built")
    parser.add_argument(
        "--table-batch-size", type=int_at_least(1), help="images per forward pass while building tables"
    )
    parser.add_argument("--workers", type=int_at_least(0), help="DataLoader workers reading image folders")
    add_table_options(parser, eval_limit=True)
    args = parser.parse_args(argv)
    try:
        check_penalties(args.penalties)
        if not 0 <= args.iso_drop < 100:
            raise ValueError(f"--iso-drop is in accuracy points, 0 <= drop < 100; got {args.iso_drop}")
        t0 = time.perf_counter()
        result = run_ablation(args)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished controllers stay in {args.runs_dir} (an interrupted one is saved and finished "
              "on the next run); rerun the same command to continue", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out) if args.out else Path(args.runs_dir) / f"report__{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", result, indent=1)
    write_markdown(result, out / "ablation.md")
    plot(result, out / "pareto.png")
    plot_allocation(result, out / "compute_allocation.png", args.headline_penalty, result.get("classes"))
    print((out / "ablation.md").read_text().split("## Confidence")[0])
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'pareto.png'}, "
          f"{out / 'compute_allocation.png'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
