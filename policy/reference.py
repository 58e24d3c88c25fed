"""A full-information reference for the one-shot controller: is PPO or the observation what limits it?

PPO sees one setting's reward per episode (a bandit). The outcome table holds every setting's correctness for every
policy-train image, so a network can instead be fit by plain supervised learning to predict all of them from the same
observation, and then run each image at the setting of highest predicted reward
``P(correct) - penalty * FLOPs / FLOPs(full)``, priced exactly as the controller is (its observation, its network,
the probe's reused work). It is a strong reference, not a bound: if it too stays under the fixed front where the
controller does, what the controller sees, not how it learns, is the limit. One network serves every penalty (the
penalty only enters the choice); it is fit on 80% of policy-train and stopped on the other 20%, never on test::

    python -m policy.reference --penalties 0.003 0.01 0.03 0.1 0.3 1 --ablation docs/results/ablation.json \\
        --out docs/results/reference
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backbone.option_checks import int_at_least
from envs import get_observation
from policy.config import DEFAULT_POLICY_CONFIG, build_policy_config, check_penalties
from policy.controller import mlp_actor_flops
from policy.evaluation import evaluate_actions, format_p, iso_accuracy, setting_prices, validation_selected
from policy.report_cli import add_table_options, print_and_write_report
from policy.training import load_backbone_for, outcome_table


class CorrectnessNet(nn.Module):
    """Observation -> logit of "setting s gets this image right" for every setting of the grid (flattened)."""

    def __init__(self, obs_mean: torch.Tensor, obs_std: torch.Tensor, settings: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("obs_mean", obs_mean)
        self.register_buffer("obs_std", obs_std)
        dim = obs_mean.numel()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, settings))  # fmt: skip
        self.arch = [hidden, hidden]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.obs_mean) / self.obs_std)

    def flops(self) -> int:
        """FLOPs per image of the network (its matmuls, the convention of ``backbone.flops``)."""
        return mlp_actor_flops(self.obs_mean.numel(), self.arch, self.net[-1].out_features)


def fit_correctness(
    obs: np.ndarray, correct: np.ndarray, seed: int = 0, hidden: int = 128, epochs: int = 60, lr: float = 1e-3,
    holdout: float = 0.2, batch_size: int = 256,
) -> tuple[CorrectnessNet, dict[str, Any]]:  # fmt: skip
    """Fit :class:`CorrectnessNet` on ``obs (n, dim)`` -> ``correct (n, *grid)`` by binary cross-entropy; keep the
    epoch with the lowest loss on a held-out ``holdout`` share (chosen by ``seed``)."""
    n = len(obs)
    if n < 10 or correct.shape[0] != n:
        raise ValueError(f"need >= 10 samples with one correctness row each, got {n} and {correct.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(obs, dtype=torch.float32)
    y = torch.as_tensor(correct.reshape(n, -1), dtype=torch.float32)
    order = torch.randperm(n, generator=gen)
    held, fit = order[: max(1, int(n * holdout))], order[max(1, int(n * holdout)) :]
    with torch.random.fork_rng():  # a seeded init that leaves the caller's random state alone
        torch.manual_seed(seed)
        net = CorrectnessNet(x[fit].mean(0), x[fit].std(0) + 1e-6, y.shape[1], hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    best = (float("inf"), -1, None)
    for epoch in range(epochs):
        net.train()
        for b in fit[torch.randperm(len(fit), generator=gen)].split(batch_size):
            loss = F.binary_cross_entropy_with_logits(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            held_loss = F.binary_cross_entropy_with_logits(net(x[held]), y[held]).item()
        if held_loss < best[0]:
            best = (held_loss, epoch, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    return net, {
        "held_out_bce": best[0],
        "best_epoch": best[1],
        "epochs": epochs,
        "fit": len(fit),
        "held_out": len(held),
    }


def reference_actions(
    net: CorrectnessNet, obs: np.ndarray, price: np.ndarray, full_flops: int, penalty: float
) -> np.ndarray:
    """Setting indices ``(n, grid.ndim)`` of highest predicted reward; ``price`` (grid shape) is what each setting
    costs the controller (``setting_prices``: the setting less what the probe already did)."""
    with torch.no_grad():
        p = torch.sigmoid(net(torch.as_tensor(obs, dtype=torch.float32))).numpy()
    reward = p - penalty * price.reshape(1, -1).astype(np.float64) / full_flops
    return np.stack(np.unravel_index(reward.argmax(1), price.shape), axis=1)


def run_reference(args: argparse.Namespace) -> dict[str, Any]:
    check_penalties(args.penalties)
    if args.ablation and not Path(args.ablation).is_file():
        raise FileNotFoundError(f"ablation file not found: {args.ablation}")
    keys = ("backbone", "data", "data_dir", "train_limit", "eval_limit", "cache_dir")
    cfg = build_policy_config(config_path=args.config, **{k: getattr(args, k) for k in keys})
    model = load_backbone_for(cfg.backbone)
    train = outcome_table(model, cfg, cfg.train_split, cfg.train_limit)
    test = outcome_table(model, cfg, cfg.eval_split, cfg.eval_limit)
    priced, reused = setting_prices(model, get_observation(test.observation))
    price = priced - reused
    val_acc = train.accuracy()
    rows, fits = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        net, fit = fit_correctness(train.obs, train.correct, seed=seed, hidden=args.hidden, epochs=args.epochs)
        fits.append(fit | {"seed": seed, "fit_s": round(time.perf_counter() - t0, 1)})
        controller_flops = test.obs_flops + net.flops()
        for penalty in args.penalties:
            actions = reference_actions(net, test.obs, price, test.grid.full_flops, penalty)
            m = evaluate_actions(test, actions, controller_flops, reused, priced)
            val = validation_selected(test, val_acc, actions, m["mean_flops"])
            rows.append({"controller": "reference", "flops_penalty": penalty, "seed": seed, "accuracy": m["accuracy"],
                         "mean_flops": m["mean_flops"], "controller_flops": controller_flops,
                         "front_accuracy_at_same_flops": m["best_fixed_accuracy_at_same_flops"],
                         "vs_best_fixed_p_value": m["vs_best_fixed_p_value"], **val,
                         "distinct_settings": m["distinct_settings"]})  # fmt: skip
    rows.sort(key=lambda r: (r["flops_penalty"], r["seed"]))
    fixed = test.grid.table(test.accuracy())
    return {
        "command": "python -m policy.reference " + " ".join(sys.argv[1:]),
        "backbone_sha256": model.checkpoint_sha256,
        "observation": test.observation,
        "split": cfg.eval_split,
        "samples": len(test.labels),
        "fit": {"split": cfg.train_split, "hidden": args.hidden, "runs": fits},
        "full": {
            "accuracy": float(test.accuracy()[test.grid.full_index]),
            "flops": test.grid.full_flops,
        },
        "rows": rows,
        "iso_accuracy": iso_accuracy(rows, fixed),
        "ppo": _ppo_rows(args.ablation) if args.ablation else [],
    }


def _ppo_rows(path: str) -> list[dict]:
    """The seed-0 controllers of an ablation.json, to print next to the reference."""
    with open(path) as f:
        controllers = json.load(f)["controllers"]
    return [c for c in controllers if c["seed"] == 0]


def format_markdown(result: dict[str, Any]) -> str:
    ppo = {(c["controller"], c["flops_penalty"]): c for c in result["ppo"]}
    fit = result["fit"]
    runs = "; ".join(f"seed {r['seed']}: best epoch {r['best_epoch']} of {r['epochs']}, held-out BCE "
                     f"{r['held_out_bce']:.4f}, {r['fit_s']} s" for r in fit["runs"])  # fmt: skip
    lines = [
        f"# Full-information reference selector on `{result['split']}` ({result['samples']} images)", "",
        f"Command: `{result['command']}`  ",
        f"Backbone sha256 `{result['backbone_sha256'][:16]}...`, observation `{result['observation']}`. One network "
        f"({fit['hidden']}x{fit['hidden']} MLP) per seed predicts every setting's correctness on {fit['split']} "
        f"({fit['runs'][0]['fit']} images fit, {fit['runs'][0]['held_out']} held out; {runs}). MFLOPs include the "
        f"observation and the network. Full setting: {result['full']['accuracy']:.2%} at "
        f"{result['full']['flops'] / 1e6:.2f} MFLOPs. PPO columns: the seed-0 controllers of the ablation.", "",
        "| penalty | seed | reference | MFLOPs | test front | McNemar p | validation-selected fixed | McNemar p "
        "| PPO one-shot | PPO sequential |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in result["rows"]:
        cells = []
        for kind in ("oneshot", "sequential"):
            c = ppo.get((kind, r["flops_penalty"])) if r["seed"] == result["rows"][0]["seed"] else None
            cells.append(f"{c['accuracy']:.2%} @ {c['mean_flops'] / 1e6:.2f}" if c else "")
        val = (
            ""
            if r["validation_fixed_accuracy"] is None
            else f"{r['validation_fixed_accuracy']:.2%} ({r['validation_fixed_setting']})"
        )
        lines.append(f"| {r['flops_penalty']:g} | {r['seed']} | {r['accuracy']:.2%} | {r['mean_flops'] / 1e6:.2f} | "
                     f"{r['front_accuracy_at_same_flops']:.2%} | {format_p(r['vs_best_fixed_p_value'])} | {val} | "
                     f"{format_p(r['vs_validation_fixed_p_value'])} | {cells[0]} | {cells[1]} |")  # fmt: skip
    iso = result["iso_accuracy"]
    lines += ["", "Iso-accuracy, rows within 0.1 points of the full setting against the cheapest fixed setting at "
        "least "
        "as accurate (the target is >= 25% fewer FLOPs): "
        + ("no row is within 0.1 points." if not iso else "; ".join(
                  f"penalty {r['flops_penalty']:g} seed {r['seed']}: {r['accuracy']:.2%} at "
                  f"{r['mean_flops'] / 1e6:.2f} MFLOPs, {_versus(r)}" for r in iso) + ".")]  # fmt: skip
    return "\n".join(lines) + "\n"


def _versus(row: dict) -> str:
    saving, cheapest = row["saving_vs_cheapest_fixed_as_accurate"], row["cheapest_fixed_as_accurate"]
    if cheapest is None:
        return "no fixed setting is as accurate"
    return f"{abs(saving):.0%} {'fewer' if saving >= 0 else 'more'} FLOPs than {cheapest}, the cheapest as accurate"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
                        help="FLOPs penalties to choose settings at; one fitted network serves all "
                        "(default: 0.003 0.01 0.03 0.1 0.3 1)")  # fmt: skip
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2],
                        help="one network per seed, its hold-out split and init (default: 0 1 2)")  # fmt: skip
    parser.add_argument(
        "--hidden", type=int_at_least(1), default=128, help="width of the network's two hidden layers (128)"
    )
    parser.add_argument(
        "--epochs", type=int_at_least(1), default=60, help="training epochs; the best on the hold-out is kept (60)"
    )
    parser.add_argument("--ablation", help="an ablation.json whose seed-0 PPO controllers are printed alongside")
    parser.add_argument("--out", default="runs/reference", help="folder for reference.{json,md} (runs/reference)")
    parser.add_argument("--backbone", help="backbone .safetensors (default: the shipped checkpoint)")
    parser.add_argument("--config", default=str(DEFAULT_POLICY_CONFIG),
                        help="PolicyConfig YAML: observation and data (default: configs/policy.yaml)")  # fmt: skip
    add_table_options(parser, eval_limit=True)
    args = parser.parse_args(argv)
    return print_and_write_report(lambda: run_reference(args), format_markdown, args.out, "reference")


if __name__ == "__main__":
    raise SystemExit(main())
