"""Choose a PPO recipe without test: k-fold cross-validation on policy-train, next to the probe cascade.

Each variant (a set of ``PolicyConfig`` overrides, e.g. ``ent_coef=0.001``) trains one one-shot controller per fold
on the other folds' outcome table, with the same code and seed as ``train_policy.py``, and is scored on the held-out
fold: accuracy, mean FLOPs (controller included) and mean reward ``accuracy - penalty * FLOPs / FLOPs(full)``, over
all folds together. The probe cascade (``policy.baselines``) is chosen and scored on the same folds, and every
variant is compared with the first by McNemar's test on the pooled held-out predictions. Variants may see different
observations (``observation=probe``): each observation gets its own outcome table, split into the same folds::

    python -m policy.recipe_cv --variants ent_coef=0.01 ent_coef=0.001 ent_coef=0 --out docs/results/recipe_cv
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
import yaml

from backbone.option_checks import int_at_least
from envs import get_observation, make_vec_env
from policy.config import DEFAULT_POLICY_CONFIG, build_policy_config, check_penalties
from policy.controller import actor_flops
from policy.evaluation import choose_cascade, evaluate_actions, format_p, mcnemar_p, setting_prices
from policy.report_cli import add_table_options, print_and_write_report
from policy.training import controller_actions, load_backbone_for, new_ppo, outcome_table


def parse_variant(text: str) -> dict[str, Any]:
    """``"ent_coef=0.001,n_epochs=5"`` -> ``{"ent_coef": 0.001, "n_epochs": 5}`` (values read as YAML)."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"variant {text!r}: expected key=value[,key=value...]")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_cv(args: argparse.Namespace) -> dict[str, Any]:
    check_penalties([args.penalty])
    base = {"backbone": args.backbone, "data": args.data, "data_dir": args.data_dir, "cache_dir": args.cache_dir,
            "train_limit": args.train_limit, "flops_penalty": args.penalty, "timesteps": args.timesteps}  # fmt: skip
    variants = [(text, parse_variant(text)) for text in args.variants]
    configs = [build_policy_config(args.config, **{**base, **overrides}) for _, overrides in variants]
    for (text, _), cfg in zip(variants, configs, strict=True):
        if cfg.controller != "oneshot":
            raise ValueError(f"variant {text!r}: only one-shot controllers are cross-validated here")
    cfg0 = configs[0]
    model = load_backbone_for(cfg0.backbone)
    table = outcome_table(model, cfg0, cfg0.train_split, cfg0.train_limit)
    if len(table) < 2 * args.folds:
        raise ValueError(f"{len(table)} samples are too few for {args.folds} folds")
    folds = np.array_split(np.random.default_rng(args.seed).permutation(len(table)), args.folds)

    def fold_tables(table) -> list[tuple]:
        """(rows held out, the other folds' table, the held-out table) per fold: the same rows for every table."""
        return [(held, table.subset(np.concatenate([f for j, f in enumerate(folds) if j != k])), table.subset(held))
                for k, held in enumerate(folds)]  # fmt: skip

    by_observation: dict[str, tuple] = {}  # per observation: its folds' tables, what each setting costs a controller
    for cfg in configs:
        if cfg.observation not in by_observation:
            seen = table if cfg.observation == cfg0.observation else outcome_table(model, cfg, cfg.train_split,
                                                                                   cfg.train_limit)  # fmt: skip
            by_observation[cfg.observation] = (
                fold_tables(seen),
                *setting_prices(model, get_observation(cfg.observation)),
            )
    full = model.grid.full_flops
    rows, pooled = [], []
    torch.set_num_threads(1)  # the controller MLP is tiny: one thread is fastest and keeps runs reproducible
    for (text, _), cfg in zip(variants, configs, strict=True):
        t0 = time.perf_counter()
        splits, priced, reused = by_observation[cfg.observation]
        correct, spent = np.zeros(len(table), bool), 0.0
        for held, fit, val in splits:
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            vec = make_vec_env(n_envs=cfg.n_envs, seed=cfg.seed, backbone=model, split=cfg.train_split,
                               flops_penalty=cfg.flops_penalty, reward=cfg.reward, observation=cfg.observation,
                               table=fit)  # fmt: skip
            ppo = new_ppo(cfg, vec)
            ppo.learn(cfg.timesteps)
            vec.close()
            actions = controller_actions(ppo.policy, val)
            m = evaluate_actions(val, actions, int(val.obs_flops) + actor_flops(ppo.policy), reused, priced)
            correct[held] = val.correct[(np.arange(len(val)), *actions.T)]
            spent += m["mean_flops"] * len(held)
        pooled.append(correct)
        row = _summary(text, correct, spent / len(table), full, cfg.flops_penalty)
        rows.append(row | {"seconds": time.perf_counter() - t0})
        print(f"{text}: {rows[-1]['accuracy']:.2%} at {rows[-1]['mean_flops'] / 1e6:.2f} MFLOPs", file=sys.stderr)
    for row, correct in zip(rows[1:], pooled[1:], strict=True):
        row["vs_first_p_value"] = mcnemar_p(correct, pooled[0])
    correct, spent = np.zeros(len(table), bool), 0.0
    for held, fit, val in by_observation[cfg0.observation][0]:
        c = choose_cascade(model, fit, val, args.penalty)
        correct[held], spent = c["outcome"], spent + c["mean_flops"] * len(held)
    cascade = _summary("probe cascade", correct, spent / len(table), full, args.penalty) | {
        "vs_first_p_value": mcnemar_p(correct, pooled[0])
    }
    return {
        "command": "python -m policy.recipe_cv " + " ".join(sys.argv[1:]),
        "backbone_sha256": model.checkpoint_sha256,
        "split": cfg0.train_split,
        "samples": len(table),
        "folds": args.folds,
        "fold_seed": args.seed,
        "flops_penalty": args.penalty,
        "variants": rows,
        "probe_cascade": cascade,
    }


def _summary(name: str, correct: np.ndarray, mean_flops: float, full: int, penalty: float) -> dict[str, Any]:
    acc = float(correct.mean())
    return {"variant": name, "accuracy": acc, "mean_flops": mean_flops, "reward": acc - penalty * mean_flops / full}


def format_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Recipe cross-validation on `{result['split']}` ({result['samples']} images, {result['folds']} folds)",
        "",
        f"Command: `{result['command']}`  ",
        f"Backbone sha256 `{result['backbone_sha256'][:16]}...`, penalty {result['flops_penalty']:g}, fold seed "
        f"{result['fold_seed']}. Every figure is over the held-out folds pooled (each image predicted once, by the "
        "controller that did not train on it); MFLOPs include the controller. McNemar p: against the first variant.",
        "",
        "| variant | accuracy | MFLOPs | reward | McNemar p | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in [*result["variants"], result["probe_cascade"]]:
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.2%} | {r['mean_flops'] / 1e6:.2f} | {r['reward']:.4f} | "
            f"{format_p(r.get('vs_first_p_value'))} | {r.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy.recipe_cv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", required=True,
                        help="PolicyConfig overrides per variant, key=value[,key=value]; e.g. ent_coef=0.01 "
                        "ent_coef=0.001 (the first is the one the others are compared with)")  # fmt: skip
    parser.add_argument("--penalty", type=float, default=0.3, help="FLOPs penalty (default 0.3)")
    parser.add_argument("--folds", type=int_at_least(2), default=5, help="number of folds of policy-train (default 5)")
    parser.add_argument("--seed", type=int_at_least(0), default=1234, help="seed of the fold split (default 1234)")
    parser.add_argument("--timesteps", type=int_at_least(1), help="PPO timesteps per fold (default: the config's)")
    parser.add_argument("--out", default="runs/recipe_cv", help="folder for recipe_cv.{json,md} (runs/recipe_cv)")
    parser.add_argument("--config", default=str(DEFAULT_POLICY_CONFIG), help="PolicyConfig YAML the variants override")
    parser.add_argument("--backbone", help="backbone .safetensors (default: the shipped checkpoint)")
    add_table_options(parser)
    args = parser.parse_args(argv)
    return print_and_write_report(lambda: run_cv(args), format_markdown, args.out, "recipe_cv")


if __name__ == "__main__":
    raise SystemExit(main())
