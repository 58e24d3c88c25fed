"""Batch-1 latency, eager vs AOT-compiled (AOTInductor): the adaptive path and the full setting, each both ways.

    python -m benchmarks.aot_batch1 --policy docs/results/demo_p0.3 [--images 256] [--repeats 5] [--threads 1]

Compiles (or loads from the cache) the front, every setting the controller picks on the images and the full setting
(``policy.aot_batch1.AotBatch1``; the first run compiles for minutes, with a line per package), checks that the
compiled adaptive path gives eager ``predict``'s settings, FLOPs and labels, then times five paths one image at a
time in paired passes (the order alternating): eager full, eager adaptive, compiled full, compiled adaptive and the
compiled front alone. Speed-ups are medians of per-pass ratios, each path against the full setting run the same
way, next to the FLOPs ratio. One thread by default: at batch 1 both paths ran faster with one than with two on the
2-core machine (eager full setting 151 against 132 images/s, ``policy.benchmark --batch-sizes 1 --threads T``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from backbone.allocator import reuse_freed_memory
from backbone.data import DataError, load_split
from backbone.fileio import write_json
from backbone.option_checks import int_at_least
from benchmarks.timing import cpu_description, images_per_second
from policy.adaptive import AdaptiveClassifier
from policy.aot_batch1 import AotBatch1

PATHS = ("full", "adaptive", "aot_full", "aot_adaptive", "aot_front")


def per_image_us(fn, images: torch.Tensor) -> float:
    return 1e6 / images_per_second(fn, images, 1)


def agreement(clf: AdaptiveClassifier, aot: AotBatch1, images: torch.Tensor) -> dict:
    """The compiled adaptive path against eager ``predict`` on the same images (eager in one batch)."""
    eager = clf.predict(images)
    got = [aot.predict(x) for x in images]
    actions = np.concatenate([g.actions for g in got])
    return {
        "same_settings": bool((actions == eager.actions).all()),
        "same_flops": bool(np.array_equal(np.concatenate([g.flops for g in got]), eager.flops)),
        "same_labels": float((torch.cat([g.labels for g in got]) == eager.labels).float().mean()),
        "max_abs_logit_diff": float((torch.cat([g.logits for g in got]) - eager.logits).abs().max()),
        "distinct_settings": len({tuple(a) for a in actions.tolist()}),
        "adaptive_mean_flops": float(eager.flops.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot_batch1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="one-shot or cascade run folder written by train_policy.py")
    parser.add_argument("--images", type=int_at_least(1), default=256, help="test images (default 256)")
    parser.add_argument("--repeats", type=int_at_least(1), default=5, help="paired timed passes (default 5)")
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--no-autotune", action="store_true", help="compile without inductor's max-autotune (4x faster to compile)"
    )
    parser.add_argument("--cache-dir", help="where compiled packages are kept (default: the user cache, aot/)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # before compiling: inductor builds the thread count into its kernels
    reuse_freed_memory()
    try:
        clf = AdaptiveClassifier.load(args.policy)
        images = load_split("test").subset(args.images).as_float()
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compiles = []

    def on_compile(name: str) -> None:
        compiles.append(name)
        print(f"compiling {name} ...", file=sys.stderr, flush=True)

    aot = AotBatch1(clf, args.cache_dir, on_compile=on_compile, max_autotune=not args.no_autotune)
    fns = {"full": clf.backbone, "adaptive": clf.predict, "aot_full": aot.full, "aot_adaptive": aot.predict,
           "aot_front": aot.front}  # fmt: skip
    runs: dict[str, list[float]] = {name: [] for name in PATHS}
    with torch.inference_mode():
        t0 = time.perf_counter()
        aot.compile_for(images)
        compile_s = time.perf_counter() - t0
        checked = agreement(clf, aot, images)
        for name in PATHS:  # warm-up, not timed
            per_image_us(fns[name], images[: max(1, len(images) // 4)])
        for r in range(args.repeats):
            for name in PATHS if r % 2 == 0 else PATHS[::-1]:
                runs[name].append(per_image_us(fns[name], images))
    ratio = clf.grid.full_flops / checked["adaptive_mean_flops"]

    def speedup(full: str, path: str) -> float:
        return statistics.median([f / a for f, a in zip(runs[full], runs[path], strict=True)])

    result = {
        "command": "python -m benchmarks.aot_batch1 " + " ".join(sys.argv[1:] if argv is None else argv),
        "policy": args.policy,
        "images": len(images),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "max_autotune": not args.no_autotune,
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "compiled": compiles,
        "compile_or_load_s": round(compile_s, 1),
        **checked,
        "flops_ratio": ratio,
        "us_per_image": {name: statistics.median(v) for name, v in runs.items()},
        "speedup_eager": speedup("full", "adaptive"),
        "speedup_aot": speedup("aot_full", "aot_adaptive"),
        "speedup_bound_from_aot_front": speedup("aot_full", "aot_front"),
        "aot_adaptive_vs_eager_adaptive": speedup("adaptive", "aot_adaptive"),
        "aot_full_vs_eager_full": speedup("full", "aot_full"),
        "us_per_image_runs": runs,
    }
    us = result["us_per_image"]
    print(f"batch 1, {len(images)} images, {result['threads']} thread(s), {result['cpu']['model']}; compiled "
          f"{len(compiles)} package(s) ({result['compile_or_load_s']} s with loading); {checked['distinct_settings']} "
          f"settings; compiled vs eager adaptive: same settings {checked['same_settings']}, same FLOPs "
          f"{checked['same_flops']}, same labels {checked['same_labels']:.2%}, "
          f"logits within {checked['max_abs_logit_diff']:.1e}")  # fmt: skip
    print("| path | full us/image | adaptive us/image | speed-up | / FLOPs ratio |")
    print("|---|---:|---:|---:|---:|")
    rows = [("eager", "full", "adaptive", "speedup_eager"), ("AOT-compiled", "aot_full", "aot_adaptive", "speedup_aot"),
            ("AOT front alone (bound)", "aot_full", "aot_front", "speedup_bound_from_aot_front")]  # fmt: skip
    for label, full, path, key in rows:
        print(f"| {label} | {us[full]:.0f} | {us[path]:.0f} | {result[key]:.2f}x | {result[key] / ratio:.0%} |")
    print(
        f"FLOPs ratio {ratio:.2f}x; compiled adaptive {result['aot_adaptive_vs_eager_adaptive']:.2f}x faster than "
        f"eager adaptive, compiled full setting {result['aot_full_vs_eager_full']:.2f}x faster than eager"
    )
    if args.json:
        write_json(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
