"""Seconds per joint-training step in fp32 and under bf16 autocast, on this machine.

    python -m benchmarks.bench_train_step [--model adaperceiver_fmnist] [--batch-size 256] [--repeats 3]
                                          [--compile] [--json results.json]

Why: bf16 autocast speeds training up only where the CPU has native bf16 kernels (AVX512-BF16/AMX); elsewhere it
is emulated and much slower, which is why ``backbone.train`` falls back to fp32 there (``native_bf16``). This
times the training loop's own ``backbone.train.train_step`` (``forward_all`` with a random width per sample,
joint loss, backward, gradient clipping, AdamW; default training options) on a random batch both ways,
``--repeats`` steps each after one warm-up step, and prints the medians. Random weights and inputs: the cost of a
step does not depend on them. ``--compile`` adds eager-vs-``torch.compile`` (fp32), the first thing to try for a
faster loop.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from timm.optim import create_optimizer_v2

from backbone import MODEL_NAMES, create_model
from backbone.fileio import write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from backbone.training import TrainConfig, native_bf16, sample_stages, sample_widths, train_step


def step_seconds(model_name: str, batch_size: int, bf16: bool, repeats: int, compile: bool = False) -> list[float]:
    """Wall-clock seconds of ``repeats`` training steps (after one untimed warm-up step, which also compiles)."""
    torch.manual_seed(0)
    model = create_model(model_name).train()
    if compile:
        model.forward_all = torch.compile(model.forward_all)  # the training step's whole forward pass
    defaults = TrainConfig()
    optimizer = create_optimizer_v2(model, "adamw", lr=defaults.lr, weight_decay=defaults.weight_decay)
    c = model.cfg
    x = torch.rand(batch_size, c.in_chans, c.img_size, c.img_size)
    y = torch.randint(c.num_classes, (batch_size,))
    widths = sample_widths(torch.tensor(c.widths), batch_size)
    stages = sample_stages(c.stages, batch_size)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        train_step(model, optimizer, x, y, widths, bf16, defaults.label_smoothing, defaults.grad_clip, stages,
                   defaults.distill_weight)  # fmt: skip
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t)
    return times


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="adaperceiver_fmnist", choices=MODEL_NAMES, help="named model size")
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=256, help="images per step (training default: 256)"
    )
    parser.add_argument(
        "--repeats", type=int_at_least(1), default=3, help="timed steps per precision (median reported)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time fp32 steps with the forward pass under torch.compile (about 90 s to compile)",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "model": args.model,
        "batch_size": args.batch_size,
        "native_bf16": native_bf16(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    variants = [("fp32", False, False), ("bf16_autocast", True, False)]
    if args.compile:
        variants.append(("fp32_compiled", False, True))
    for name, bf16, compile in variants:
        times = step_seconds(args.model, args.batch_size, bf16, args.repeats, compile)
        result[name] = {"step_s": times, "median_step_s": statistics.median(times),
                        "img_per_s": args.batch_size / statistics.median(times)}  # fmt: skip
        print(f"{name:14s} median {statistics.median(times):6.2f} s/step = {result[name]['img_per_s']:6.1f} img/s "
              f"(steps: {', '.join(f'{t:.2f}' for t in times)})", flush=True)  # fmt: skip
    ratio = result["bf16_autocast"]["median_step_s"] / result["fp32"]["median_step_s"]
    result["bf16_over_fp32_time"] = ratio
    print(f"bf16 autocast takes {ratio:.2f}x the fp32 step time; native bf16 on this CPU: {result['native_bf16']}")
    if args.compile:
        result["compiled_over_fp32_time"] = result["fp32_compiled"]["median_step_s"] / result["fp32"]["median_step_s"]
        print(f"torch.compile takes {result['compiled_over_fp32_time']:.2f}x the eager fp32 step time")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
