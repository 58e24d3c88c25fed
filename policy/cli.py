"""Command line of ``python train_policy.py`` (kept here so the script itself stays a thin entry point)."""

from __future__ import annotations

import argparse
import sys

from backbone.option_checks import int_at_least
from policy.config import DEFAULT_POLICY_CONFIG

DESCRIPTION = """Train a PPO controller that picks (tokens, depth, width) per input for a frozen AdaPerceiver
backbone (or fit a probe cascade, --controller cascade), then report what it buys on the test split. Defaults come
from configs/policy.yaml (shipped with the package); every option below overrides it. Writes policy.zip (a cascade:
cascade.json), policy.json, config.yaml, eval.json, timing.json and progress.csv (PPO only) to the run folder.
Ctrl-C saves the policy and prints the command that resumes it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_policy.py", description=DESCRIPTION)
    p.add_argument(
        "--flops-penalty",
        type=float,
        metavar="P",
        help="reward = correct - P * FLOPs(setting) / FLOPs(full); larger P buys more savings (default 0.3)",
    )
    p.add_argument(
        "--config",
        default=str(DEFAULT_POLICY_CONFIG),
        help="YAML file with PolicyConfig defaults (default: %(default)s)",
    )
    p.add_argument(
        "--controller",
        choices=["oneshot", "sequential", "cascade"],
        help="oneshot (default): the whole setting from cheap features in one decision; sequential: stage, tokens "
        "and width first, then after every block stop or go on, seeing the running prediction (each look and "
        "decision is charged its FLOPs); cascade: no PPO, the probe's answer when its top-1 probability >= tau, "
        "else one setting X, (tau, X) fitted on policy-train by the same reward in seconds (writes cascade.json "
        "instead of policy.zip)",
    )
    p.add_argument("--backbone", help="backbone .safetensors (default: the shipped Fashion-MNIST backbone)")
    p.add_argument(
        "--data",
        help="task: fmnist (default) or an image-folder root ROOT/<split>/<class>/<image> that the backbone was "
        "trained on (python -m backbone.train --data ROOT): the controller learns on ROOT/policy-train/ or, without "
        "it, on exactly the hold-out of ROOT/train/ recorded in the backbone, and is reported on ROOT/test/",
    )
    p.add_argument(
        "--data-dir",
        help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or /usr/share/datasets/"
        "fashion-mnist, from `apt-get install dataset-fashion-mnist`)",
    )
    p.add_argument("--timesteps", type=int_at_least(1), help="PPO environment steps, one image each (default 300000)")
    p.add_argument("--n-envs", type=int_at_least(1), help="parallel environment copies (default 8)")
    p.add_argument("--seed", type=int_at_least(0), help="seed of PPO, environments and torch (default 0)")
    p.add_argument(
        "--reward",
        choices=["correct", "neg_ce"],
        help="accuracy term of the reward: 0/1 correctness or minus the cross-entropy (default correct)",
    )
    p.add_argument("--observation", help="observation spec: pooled_probe (default), pooled or probe")
    p.add_argument(
        "--out", help="run folder (default: runs/<task>__p<penalty>__s<seed>__<time> in the working directory)"
    )
    p.add_argument(
        "--wandb",
        choices=["disabled", "offline", "online"],
        help="Weights & Biases logging; offline works without network (default disabled)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="run folder (or its policy.zip) to finish in place: PPO continues from its last checkpoint until "
        "--timesteps in total, then RUN gets the evaluation",
    )
    p.add_argument("--device", help="torch device of the controller (default cpu; the MLP is tiny)")
    p.add_argument(
        "--train-limit", type=int_at_least(0), help="train on the first N policy-train images only (smoke tests)"
    )
    p.add_argument("--eval-limit", type=int_at_least(0), help="evaluate on the first N test images only (smoke tests)")
    p.add_argument(
        "--cache-dir", help="outcome-table cache (default $ADAPERCEIVER_CACHE_DIR or ~/.cache/adaperceiver-rl/tables)"
    )
    p.add_argument("--table-device", help="torch device of the backbone while outcome tables are built (default cpu)")
    p.add_argument(
        "--table-batch-size", type=int_at_least(1), help="images per forward pass while building tables (default 500)"
    )
    p.add_argument("--workers", type=int_at_least(0), help="DataLoader workers reading image folders (default 2)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


# options that only a PPO controller has; a cascade run refuses them rather than ignore them
PPO_ONLY = ("timesteps", "n_envs", "reward", "observation", "resume", "wandb", "device")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.controller == "cascade":
        given = [f"--{name.replace('_', '-')}" for name in PPO_ONLY if getattr(args, name) is not None]
        if given:
            print(f"error: {', '.join(given)} do not apply to --controller cascade (no PPO: it is fitted in seconds, "
                  "observing the probe)", file=sys.stderr)  # fmt: skip
            return 2
    from backbone.data import DataError
    from backbone.interrupt import EXIT_INTERRUPTED
    from policy.config import build_policy_config
    from policy.evaluation import format_report
    from policy.training import ControllerInterrupted, train_controller

    try:
        cfg = build_policy_config(
            args.config,
            flops_penalty=args.flops_penalty,
            controller=args.controller,
            backbone=args.backbone,
            data=args.data,
            data_dir=args.data_dir,
            timesteps=args.timesteps,
            n_envs=args.n_envs,
            seed=args.seed,
            reward=args.reward,
            observation=args.observation,
            out=args.out,
            wandb=args.wandb,
            device=args.device,
            train_limit=args.train_limit,
            eval_limit=args.eval_limit,
            cache_dir=args.cache_dir,
            table_device=args.table_device,
            table_batch_size=args.table_batch_size,
            workers=args.workers,
        )
        out, metrics = train_controller(cfg, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ControllerInterrupted as e:
        print(f"interrupted: policy saved at {e.timesteps} timesteps in {e.out}; resume with: "
              f"python train_policy.py --resume {e.out}", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted before PPO started: no controller saved (finished outcome tables stay cached)",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    print(format_report(metrics))
    print(f"run folder: {out}")
    return 0
