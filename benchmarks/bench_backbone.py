"""Inference speed of the AdaPerceiver backbone next to the machine's fp32 matmul rate.

    python -m benchmarks.bench_backbone [--model adaperceiver_fmnist] [--checkpoint PATH] [--batch-size 256]
                                        [--repeats 5] [--threads 0] [--json results.json]

Prints, for the full, a middle and the smallest setting: images/s (median of ``--repeats`` timed passes after a
warm-up, ``torch.inference_mode``), analytic FLOPs per image and the achieved GFLOP/s; the full setting's fraction of
the machine's fp32 matmul rate (large square matmul); and the smallest setting's wall-clock speedup over the full
one next to its FLOPs ratio (speedup / FLOPs ratio = 1 would mean the FLOP savings turn fully into time savings).

Run it on an otherwise idle machine: the numbers are meaningless while something else (a training job) competes
for the cores.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from backbone import AdaPerceiver, create_model, load_backbone
from backbone.allocator import reuse_freed_memory
from backbone.fileio import write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from backbone.settings import Setting
from benchmarks.timing import cpu_description, matmul_gflops, median_seconds


def pick_settings(model: AdaPerceiver) -> dict[str, Setting]:
    """Full, smallest and a middle setting (the middle of every axis; half depth)."""
    grid = model.grid
    middle = tuple(n // 2 - 1 if axis == "depth" else n // 2 for axis, n in zip(grid.axes, grid.shape, strict=True))
    return {"full": grid.full, "middle": grid.setting(tuple(max(0, i) for i in middle)), "smallest": grid.smallest}


def bench_setting(model: AdaPerceiver, x: torch.Tensor, setting: Setting, repeats: int) -> dict:
    with torch.inference_mode():
        seconds = median_seconds(lambda: model(x, *setting), repeats, warmup=2)
    flops = model.flops(*setting)
    images_per_s = len(x) / seconds
    return {
        **{k: v for k, v in setting._asdict().items() if v is not None},
        "mflops_per_image": flops / 1e6,
        "ms_per_batch": 1e3 * seconds,
        "images_per_s": images_per_s,
        "gflops_per_s": flops * images_per_s / 1e9,
    }


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="adaperceiver_fmnist", help="named size (untrained weights)")
    parser.add_argument("--checkpoint", help="backbone .safetensors to time instead of --model")
    parser.add_argument("--batch-size", type=int_at_least(1), default=256, help="images per forward pass")
    parser.add_argument(
        "--repeats", type=int_at_least(1), default=5, help="timed passes per measurement (median reported)"
    )
    parser.add_argument(
        "--threads", type=int_at_least(0), default=0, help="torch intra-op threads (0 = torch's default)"
    )
    parser.add_argument("--matmul-size", type=int_at_least(1), default=2048, help="side of the square fp32 matmul")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reuse_freed_memory()

    try:
        model = load_backbone(args.checkpoint) if args.checkpoint else create_model(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    c = model.cfg
    x = torch.rand(args.batch_size, c.in_chans, c.img_size, c.img_size)

    matmul = matmul_gflops(args.matmul_size, args.repeats)
    results = {name: bench_setting(model, x, s, args.repeats) for name, s in pick_settings(model).items()}
    full, small = results["full"], results["smallest"]
    speedup = small["images_per_s"] / full["images_per_s"]
    flops_ratio = full["mflops_per_image"] / small["mflops_per_image"]
    summary = {
        "config": {
            "model": args.checkpoint or args.model,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "matmul_size": args.matmul_size,
            "cpu": cpu_description(),
            "python": platform.python_version(),
        },
        "matmul_gflops_per_s": matmul,
        "settings": results,
        "full_fraction_of_matmul": full["gflops_per_s"] / matmul,
        "smallest_speedup_over_full": speedup,
        "smallest_flops_ratio": flops_ratio,
        "speedup_over_flops_ratio": speedup / flops_ratio,
    }

    cfg = summary["config"]
    print(f"# Backbone inference benchmark: `{cfg['model']}`\n")
    print(f"torch {cfg['torch']}, {cfg['threads']} threads, batch {cfg['batch_size']}, median of {cfg['repeats']}, "
          f"{cfg['cpu']['model']} ({', '.join(cfg['cpu']['isa'])})\n")  # fmt: skip
    print(f"fp32 matmul ({args.matmul_size}^2): **{matmul:.1f} GFLOP/s**\n")
    print("| setting | tokens | depth | width | MFLOPs/img | ms/batch | images/s | GFLOP/s | % of matmul |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens']} | {r['depth']} | {r['width']} | {r['mflops_per_image']:.2f} | "
              f"{r['ms_per_batch']:.1f} | {r['images_per_s']:.0f} | {r['gflops_per_s']:.1f} | "
              f"{100 * r['gflops_per_s'] / matmul:.1f}% |")  # fmt: skip
    print()
    print(f"- full setting reaches {100 * summary['full_fraction_of_matmul']:.1f}% of the matmul rate")
    print(f"- smallest setting: {speedup:.1f}x faster than full for {flops_ratio:.1f}x fewer FLOPs "
          f"(speedup / FLOPs ratio = {summary['speedup_over_flops_ratio']:.2f})")  # fmt: skip
    if args.json:
        write_json(args.json, summary)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
