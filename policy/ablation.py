"""Where do controllers sit? Every fixed setting, confidence early exit, random, oracle and controllers.

    python -m policy.ablation --penalties 0.01 0.03 0.1 0.3 [--policies RUN ...] [--out FOLDER]

Controllers not given with --policies are trained with the same code as ``train_policy.py`` (into
``--runs-dir``; a finished run there is reused). Everything is scored on the test split's outcome table and
written as ``ablation.json``, ``ablation.md`` and ``pareto.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from backbone.data import DataError
from backbone.fileio import atomic_write, write_json
from backbone.flops import flops_breakdown
from backbone.interrupt import EXIT_INTERRUPTED
from backbone.settings import Setting
from envs import get_observation
from policy.baselines import early_exit, oracle, random_matched
from policy.config import DEFAULT_POLICY_CONFIG, build_policy_config
from policy.controller import choose_actions, load_ppo
from policy.evaluation import evaluate_actions
from policy.sidecar import check_compatible, resolve_run
from policy.training import load_backbone_for, outcome_table, train_controller

TAUS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.01)


def find_or_train(
    cfg_kwargs: dict, penalty: float, given: dict[float, Path], runs_dir: Path, seed: int, task: str = "fmnist"
) -> Path:
    """A run folder for ``penalty``: one given with --policies, a finished one in runs_dir, or a new one."""
    if penalty in given:
        return given[penalty]
    run = runs_dir / f"{task}__p{penalty:g}__s{seed}"
    if (run / "eval.json").is_file():
        print(f"reusing controller {run}", file=sys.stderr)
        return run
    resume = str(run) if (run / "policy.zip").is_file() else None  # an interrupted earlier run is finished
    print(f"{'finishing' if resume else 'training'} controller for penalty {penalty:g} -> {run}", file=sys.stderr)
    cfg = build_policy_config(**{**cfg_kwargs, "flops_penalty": penalty, "seed": seed, "out": str(run)})
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
    model = load_backbone_for(cfg.backbone)
    table = outcome_table(model, cfg, cfg.eval_split, cfg.eval_limit)
    grid = table.grid
    acc = table.accuracy()
    flops = grid.flops
    fixed = grid.table(acc)
    depth_axis = grid.axis("depth")
    early = {}
    for index in np.ndindex(*grid.shape[:depth_axis], *grid.shape[depth_axis + 1 :]):  # every path along depth
        path = (*index[:depth_axis], slice(None), *index[depth_axis:])
        first = grid.setting(tuple(0 if isinstance(i, slice) else i for i in path))
        write = flops_breakdown(model.cfg, first.tokens, 1, first.width, first.stage)
        label = ("" if first.stage is None else f"s{first.stage}/") + f"{first.tokens}/{first.width}"
        early[label] = early_exit(table.correct, table.confidence, flops, write["write"] + write["head"], TAUS, path)

    given = {}
    for run in args.policies or []:
        _, side = resolve_run(run)
        given[float(side["flops_penalty"])] = Path(run)
    penalties = sorted(set(args.penalties) | set(given))
    controllers = []
    for p in penalties:
        run = find_or_train(base, p, given, Path(args.runs_dir), args.seed, cfg.task)
        zip_path, side = resolve_run(run)
        check_compatible(side, model.checkpoint_sha256, model.grid, table.observation)
        policy = load_ppo(zip_path).policy
        reused = get_observation(side["observation"]).reused_flops(model)
        m = evaluate_actions(table, choose_actions(policy, table.obs), side["controller_flops"], reused)
        front_acc = m["best_fixed_accuracy_at_same_flops"]
        rand = random_matched(table.correct, flops, m["mean_flops"], seed=args.seed)
        controllers.append(
            {
                "run": str(run),
                "flops_penalty": p,
                "accuracy": m["accuracy"],
                "mean_flops": m["mean_flops"],
                "controller_flops": m["controller_flops"],
                "distinct_settings": m["distinct_settings"],
                "front_accuracy_at_same_flops": front_acc,
                "on_or_above_front": bool(m["accuracy"] >= front_acc),
                "best_fixed_setting_at_same_flops": m["best_fixed_setting_at_same_flops"],
                "vs_best_fixed_p_value": m["vs_best_fixed_p_value"],
                "random_matched": rand,
                "top_settings": dict(list(m["setting_counts"].items())[:5]),
            }
        )
    return {
        "backbone": str(model.checkpoint_path),
        "backbone_sha256": model.checkpoint_sha256,
        "data": cfg.task,
        "split": cfg.eval_split,
        "samples": len(table.labels),
        "observation": table.observation,
        "seed": args.seed,
        "command": "python -m policy.ablation " + " ".join(sys.argv[1:]),
        "fixed": fixed,
        "early_exit": early,
        "oracle": oracle(table.correct, flops),
        "controllers": controllers,
    }


def write_markdown(result: dict[str, Any], path: Path) -> None:
    full = max(result["fixed"], key=lambda r: r["flops"])
    fmt = lambda f: f"{f / 1e6:.2f}"  # noqa: E731
    lines = [
        f"# Ablation on `{result['split']}` ({result['samples']} images)",
        "",
        f"Command: `{result['command']}`  ",
        f"Backbone sha256 `{result['backbone_sha256'][:16]}...`, observation `{result['observation']}`, "
        f"seed {result['seed']}. FLOPs per image; controllers include their own overhead.",
        "",
        "## Controllers",
        "",
        "| penalty | accuracy | MFLOPs | saving vs full | fixed front at same FLOPs | on/above front | McNemar p vs "
        "best fixed | random @ same FLOPs | settings used |",
        "|---:|---:|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for r in result["controllers"]:
        rand = r["random_matched"]
        lines.append(
            f"| {r['flops_penalty']:g} | {r['accuracy']:.2%} | {fmt(r['mean_flops'])} | "
            f"{1 - r['mean_flops'] / full['flops']:.1%} | {r['front_accuracy_at_same_flops']:.2%} | "
            f"{'yes' if r['on_or_above_front'] else 'no'} | {_p(r['vs_best_fixed_p_value'])} | "
            f"{'n/a' if rand is None else format(rand['accuracy'], '.2%')} | {r['distinct_settings']} |"
        )
    o = result["oracle"]
    lines += [
        "",
        f"Full setting: {full['accuracy']:.2%} at {fmt(full['flops'])} MFLOPs. "
        f"Oracle (cheapest correct setting): {o['accuracy']:.2%} at {fmt(o['mean_flops'])} MFLOPs.",
        "",
        "## Confidence early exit (tokens = max, width = max)",
        "",
        "| tau | accuracy | MFLOPs |",
        "|---:|---:|---:|",
    ]
    key = list(result["early_exit"])[-1]
    lines += [f"| {e['tau']:g} | {e['accuracy']:.2%} | {fmt(e['mean_flops'])} |" for e in result["early_exit"][key]]
    lines += [
        "",
        "## Fixed-setting Pareto front",
        "",
        "| setting | MFLOPs | accuracy |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {Setting.of_row(r)} | {fmt(r['flops'])} | {r['accuracy']:.2%} |"
        for r in sorted((r for r in result["fixed"] if r["pareto"]), key=lambda r: r["flops"])
    ]
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    fixed = result["fixed"]
    ax.scatter(
        [r["flops"] / 1e6 for r in fixed], [100 * r["accuracy"] for r in fixed], s=10, c="0.7", label="fixed settings"
    )
    front = sorted((r for r in fixed if r["pareto"]), key=lambda r: r["flops"])
    ax.step(
        [r["flops"] / 1e6 for r in front],
        [100 * r["accuracy"] for r in front],
        where="post",
        c="k",
        lw=1,
        label="fixed-setting Pareto front",
    )
    key = list(result["early_exit"])[-1]
    ee = result["early_exit"][key]
    ax.plot(
        [e["mean_flops"] / 1e6 for e in ee],
        [100 * e["accuracy"] for e in ee],
        "-o",
        ms=3,
        c="tab:blue",
        label=f"confidence early exit ({key} tokens/width, tau swept)",
    )
    o = result["oracle"]
    ax.scatter([o["mean_flops"] / 1e6], [100 * o["accuracy"]], marker="*", s=140, c="tab:green", label="oracle")
    rand = [r["random_matched"] for r in result["controllers"] if r["random_matched"]]
    ax.scatter(
        [r["mean_flops"] / 1e6 for r in rand],
        [100 * r["accuracy"] for r in rand],
        marker="x",
        c="tab:purple",
        label="random settings at matched FLOPs",
    )
    ctrl = result["controllers"]
    ax.scatter(
        [r["mean_flops"] / 1e6 for r in ctrl],
        [100 * r["accuracy"] for r in ctrl],
        s=50,
        c="tab:red",
        zorder=5,
        label="PPO controllers (overhead included)",
    )
    for r in ctrl:
        ax.annotate(
            f"p={r['flops_penalty']:g}",
            (r["mean_flops"] / 1e6, 100 * r["accuracy"]),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ys = [100 * r["accuracy"] for r in front] + [100 * r["accuracy"] for r in ctrl]
    ax.set_ylim(max(0, min(ys) - 3), min(100, max([*ys, 100 * o["accuracy"]]) + 1))
    ax.set_xlabel("mean MFLOPs per image (log scale)")
    ax.set_ylabel(f"top-1 accuracy on {result['split']} (%)")
    ax.set_title("Accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--penalties",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3],
        help="FLOPs penalties of the controllers to compare (default: 0.01 0.03 0.1 0.3)",
    )
    parser.add_argument("--policies", nargs="*", help="existing run folders to use (their penalty is read from them)")
    parser.add_argument("--backbone", help="backbone .safetensors (default: the shipped checkpoint)")
    parser.add_argument("--config", default=str(DEFAULT_POLICY_CONFIG), help="PolicyConfig YAML for new controllers")
    parser.add_argument("--timesteps", type=int, help="PPO timesteps of newly trained controllers")
    parser.add_argument("--seed", type=int, default=0, help="seed of new controllers and of the random baseline")
    parser.add_argument("--runs-dir", default="runs/ablation", help="where missing controllers are trained")
    parser.add_argument(
        "--out", help="folder for ablation.json, ablation.md, pareto.png (default: a new RUNS_DIR/report__<time>)"
    )
    parser.add_argument("--data", help="fmnist (default) or an image-folder root ROOT/<split>/<class>/<image>")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder")
    parser.add_argument("--table-device", help="torch device of the backbone while outcome tables are built")
    parser.add_argument("--table-batch-size", type=int, help="images per forward pass while building tables")
    parser.add_argument("--workers", type=int, help="DataLoader workers reading image folders")
    parser.add_argument("--train-limit", type=int, help="first N policy-train images only (smoke tests)")
    parser.add_argument("--eval-limit", type=int, help="first N test images only (smoke tests)")
    parser.add_argument("--cache-dir", help="outcome-table cache folder")
    args = parser.parse_args(argv)
    try:
        for p in args.penalties:
            if not np.isfinite(p) or p < 0:
                raise ValueError(f"penalties must be finite and >= 0, got {p}")
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
    print((out / "ablation.md").read_text().split("## Confidence")[0])
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
