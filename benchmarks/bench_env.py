"""Cost of the compute environment: outcome-table build time and table-mode env steps per second.

    python -m benchmarks.bench_env [--backbone PATH | --model adaperceiver_test] [--split policy-train]
                                   [--limit N] [--steps 100000] [--repeats 3] [--json results.json]

Prints (1) the time to build the outcome table of the split from scratch (into a temporary cache folder, so no
cached table is reused), and reading it back from that cache; (2) single-environment table-mode throughput in env
steps/s: one ``reset()`` + one ``step()`` per episode (an episode is one step), random valid actions generated
beforehand, median of ``--repeats`` timed runs after a short warm-up.

``--model NAME`` benchmarks a named size with random weights instead of a checkpoint (for when none exists yet).
Run it on an otherwise idle machine for numbers worth reporting.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from backbone import DEFAULT_BACKBONE, AdaPerceiver, create_model, load_backbone
from backbone.data import SPLITS, load_split
from backbone.fileio import write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from envs import AdaPerceiverComputeEnv, load_or_build


def table_mode_steps_per_s(env: AdaPerceiverComputeEnv, actions: np.ndarray, repeats: int) -> list[float]:
    """Env steps/s (reset + step per episode) of each of ``repeats`` timed passes over ``actions``."""
    env.reset(seed=0)
    for a in actions[: min(len(actions), 1000)]:  # warm-up
        env.reset()
        env.step(a)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in actions:
            env.reset()
            env.step(a)
        rates.append(len(actions) / (time.perf_counter() - t0))
    return rates


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--backbone", default=str(DEFAULT_BACKBONE), help="backbone checkpoint (.safetensors)")
    parser.add_argument("--model", help="benchmark this named size with random weights instead of --backbone")
    parser.add_argument("--split", default="policy-train", choices=SPLITS, help="data split of the outcome table")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    parser.add_argument(
        "--limit", type=int_at_least(0), default=0, help="use the first N images of the split only (0 = all)"
    )
    parser.add_argument("--observation", default="pooled_probe", help="observation spec")
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=500, help="images per forward pass while building"
    )
    parser.add_argument("--steps", type=int_at_least(1), default=100_000, help="episodes (reset + step) per timed run")
    parser.add_argument("--repeats", type=int_at_least(1), default=3, help="timed runs (the median is reported)")
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the random actions (and --model weights)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    try:
        if args.model:
            torch.manual_seed(args.seed)
            model: AdaPerceiver = create_model(args.model).eval()
            source = f"{args.model} (random weights)"
        else:
            model = load_backbone(args.backbone)
            source = args.backbone
        t0 = time.perf_counter()
        dataset = load_split(args.split, args.data_dir)
        if args.limit:
            dataset = dataset.subset(args.limit)
        load_data_s = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        hint = "" if args.model else " (no checkpoint yet? try --model adaperceiver_test --limit 1000)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_env_") as cache:
        t0 = time.perf_counter()
        table = load_or_build(model, args.split, observation=args.observation, cache_dir=cache, dataset=dataset,
                              progress=False, batch_size=args.batch_size)  # fmt: skip
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = load_or_build(model, args.split, observation=args.observation, cache_dir=cache, dataset=dataset,
                               progress=False)  # fmt: skip
        cached_s = time.perf_counter() - t0
        assert np.array_equal(cached.correct, table.correct)

    env = AdaPerceiverComputeEnv(backbone=model, split=args.split, table=table, observation=args.observation)
    rng = np.random.default_rng(args.seed)
    actions = rng.integers(0, env.action_space.nvec, size=(args.steps, table.grid.ndim))
    rates = table_mode_steps_per_s(env, actions, args.repeats)
    median = statistics.median(rates)

    results = {
        "backbone": source,
        "backbone_sha256": table.backbone_sha256,
        "split": args.split,
        "samples": len(table),
        "settings": len(table.grid),
        "observation": args.observation,
        "torch_threads": torch.get_num_threads(),
        "load_data_s": round(load_data_s, 3),
        "table_build_s": round(build_s, 3),
        "table_cached_load_s": round(cached_s, 3),
        "steps": args.steps,
        "env_steps_per_s_runs": [round(r) for r in rates],
        "env_steps_per_s_median": round(median),
        "us_per_step": round(1e6 / median, 2),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    dims = "x".join(map(str, table.grid.shape))
    print(f"backbone {source}, split {args.split}: {len(table)} images x {len(table.grid)} settings ({dims})")
    print(f"(1) outcome table build (no cache): {build_s:.2f} s   [data load {load_data_s:.2f} s, "
          f"cached re-load {cached_s:.3f} s, torch threads {torch.get_num_threads()}]")  # fmt: skip
    print(f"(2) table-mode single env: {median:,.0f} env steps/s (reset+step; median of {args.repeats} x "
          f"{args.steps:,} steps: {', '.join(f'{r:,.0f}' for r in rates)}) = {1e6 / median:.1f} us/step")  # fmt: skip
    if args.json:
        write_json(args.json, results, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
