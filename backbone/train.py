"""Joint (once-for-all) training of an AdaPerceiver backbone: the command line.

    python -m backbone.train [--config configs/backbone_fmnist_stages.yaml] [key=value ...] [--resume RUN]

Options flow dinov2-style: TrainConfig defaults <- the YAML file <- ``key=value`` overrides <- flags. The run folder
(default ``runs/backbone__<model>__s<seed>__<time>`` in the working directory) gets ``config.yaml``, ``log.jsonl``,
``train_state.pt`` (atomic, every ``checkpoint_every`` steps and each epoch) and finally ``backbone.safetensors``.

Several processes (one machine or several) run under torchrun, with the same options:

    torchrun --nproc_per_node N -m backbone.train [--config ...] [key=value ...] [--resume RUN]
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from typing import Any

from backbone.distributed import is_main, process_group
from backbone.fileio import packaged_file
from backbone.interrupt import EXIT_INTERRUPTED
from backbone.settings_io import build_dataclass, load_yaml, merge, parse_overrides
from backbone.training import TrainConfig, TrainingInterrupted, train

DEFAULT_CONFIG = packaged_file("configs", "backbone_fmnist_stages.yaml")  # the shipped default's recipe
RECORDED_KEYS = ("world_size", "per_process_batch")  # written to a run's config.yaml; facts of the run, not options
TORCHRUN_HELP = """several processes: torchrun --nproc_per_node N -m backbone.train [same options]
  (add --nnodes M --node_rank R --rdzv_endpoint HOST:PORT on each of M machines). batch_size stays the global batch,
  split evenly over the N*M processes (an error if it does not divide); each process trains on its shard of every
  batch and the parameters follow those of one process with the same batch_size and seed. device=cuda gives each
  process its own GPU (NCCL), device=cpu uses gloo. Rank 0 writes the run folder; config.yaml records world_size
  and per_process_batch. --resume needs the run folder on a filesystem every machine sees, and may change N."""


def build_config(config_path: str | None, overrides: list[str], **cli: Any) -> TrainConfig:
    values = load_yaml(config_path) if config_path else {}
    values = {k: v for k, v in values.items() if k not in RECORDED_KEYS}  # a run's config.yaml is a valid --config
    values = merge(values, parse_overrides(overrides))
    values = merge(values, {k: v for k, v in cli.items() if v is not None})
    return build_dataclass(TrainConfig, values, source=str(config_path or "options"))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and the option list in the epilog kept one per line."""


def _options_help() -> str:
    """Every TrainConfig option with its default and the comment beside it in the source (for ``--help``)."""
    lines = ["key=value options (TrainConfig; nested ones as model_overrides.FIELD=VALUE):"]
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+= (.+?)\s+# (.+)", line)
        if m:
            name, default, comment = m.groups()
            default = default.replace("field(default_factory=dict)", "{}").strip('"')
            lines.append(f"  {name}={default}: {comment}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbone.train",
        description=__doc__.split("\n\n")[0],
        epilog=f"{_options_help()}\n\n{TORCHRUN_HELP}",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file of TrainConfig options")
    parser.add_argument("overrides", nargs="*", help="TrainConfig options as key=value (e.g. epochs=2 lr=1e-3)")
    parser.add_argument("--resume", metavar="RUN", help="run folder (or its train_state.pt) to continue, in place")
    parser.add_argument("--out", help="run folder (overrides the config's `out`)")
    parser.add_argument(
        "--data",
        help="task: fmnist (default) or your own image folder ROOT/<split>/<class>/<image> with ROOT/train/ and "
        "ROOT/test/ (ROOT/policy-train/ optional; without it policy_fraction of each class of train/ is held out for "
        "the controller and recorded in the checkpoint). Set model_overrides.num_classes (and in_chans=3 + three "
        "mean/std values for RGB). Small-data recipe: at least min_steps optimiser steps (epochs are raised to reach "
        "them) and random shift + flip when train/ has fewer than small_data images. What to expect: on a few "
        "thousand images accuracy keeps rising well past 12 epochs, so budget min_steps (1500 steps of batch 256 "
        "take about 50 minutes for the fmnist-sized model on 2 CPU cores)",
    )
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    parser.add_argument(
        "--image-folder",
        help="train on a flat ROOT/<class>/<image> tree instead of Fashion-MNIST (resized to the model's "
        "img_size; set model_overrides.num_classes / in_chans / mean / std to match)",
    )
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], help="Weights & Biases logging mode")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = build_config(args.config, args.overrides, out=args.out, data_dir=args.data_dir, wandb=args.wandb,
                           image_folder=args.image_folder, data=args.data)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with process_group(cfg.device):
        return _run(cfg, args.resume, argv)


def _run(cfg: TrainConfig, resume: str | None, argv: list[str] | None) -> int:
    """Train and report; with several processes every rank trains and rank 0 alone prints."""
    try:
        summary = train(cfg, resume=resume)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        if is_main():  # every rank meets the same bad option: one line, not one per process
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if not is_main():
            return EXIT_INTERRUPTED
        saved = f"training state of step {e.saved_step} saved in {e.out}" if e.saved_step else "no step saved yet"
        rerun = " ".join(["python -m backbone.train", *(argv if argv is not None else sys.argv[1:])])
        hint = f"; resume with: {rerun} --resume {e.out}" if e.saved_step else ""
        print(f"interrupted: {saved}{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if is_main():
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
