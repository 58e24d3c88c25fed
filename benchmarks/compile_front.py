"""Would ``torch.compile`` lift the batch-1 ceiling? The full setting and the controller's front, eager vs compiled.

At batch 1 every image pays the front (probe-stage embedding, probe, observation, controller network) before its
setting runs, so ``full / front`` bounds the adaptive speed-up (``policy.benchmark`` reports it). This times both at
batch 1, eager and compiled with inductor (``dynamic=False``, compiled once, warm), over the same images, and prints
the bound each way; compiled outputs are checked against eager ones::

    python -m benchmarks.compile_front --policy docs/results/demo_p0.3 [--images 128] [--repeats 5]

``--batch-size 256`` times the same at batch 256 (whole batches of the images only), where it says what compiling
gains the full setting's large matmuls, against what ``benchmarks.operator_variants``'s ``compiled`` variant gains
the adaptive path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from backbone.allocator import reuse_freed_memory
from backbone.data import DataError, load_split
from backbone.fileio import write_json
from backbone.option_checks import int_at_least
from benchmarks.timing import cpu_description
from policy.adaptive import AdaptiveClassifier
from policy.cascade import ProbeCascade
from policy.controller import action_logits


def front_logits(clf: AdaptiveClassifier, x: torch.Tensor) -> torch.Tensor:
    """The front's tensor work up to the controller's action logits (the argmax after it is a few numpy ops; a
    cascade's comparison with tau is one)."""
    memory, probe = clf.spec.embed_and_probe(clf.backbone, x)
    obs = clf.spec.compute(clf.backbone, memory, None if probe is None else probe[1])
    return obs if isinstance(clf.policy, ProbeCascade) else action_logits(clf.policy, obs)  # a cascade: one comparison


def per_image_us(fn, batches: list[torch.Tensor], repeats: int) -> float:
    """Median over ``repeats`` passes of the time per image, one batch per call, after one warm-up pass."""
    for x in batches:
        fn(x)
    images = sum(len(x) for x in batches)
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        passes.append((time.perf_counter() - t0) / images)
    return statistics.median(passes) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="one-shot run folder written by train_policy.py")
    parser.add_argument(
        "--images", type=int_at_least(1), default=128, help="test images, timed in whole batches (default 128)"
    )
    parser.add_argument("--repeats", type=int_at_least(1), default=5, help="timed passes (median reported; default 5)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=1, help="images per call (default 1)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    try:
        clf = AdaptiveClassifier.load(args.policy)
        if args.images < args.batch_size:
            raise ValueError(f"--images {args.images} is less than one batch of --batch-size {args.batch_size}")
        whole = args.images - args.images % args.batch_size  # compiled with dynamic=False: one batch shape
        images = list(load_split("test").subset(whole).as_float().split(args.batch_size))
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = clf.backbone.eval()
    paths = {"full": model, "front": lambda x: front_logits(clf, x)}
    command = "python -m benchmarks.compile_front " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict = {"policy": args.policy, "images": sum(len(x) for x in images), "batch_size": args.batch_size,
                    "repeats": args.repeats, "cpu": cpu_description(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "command": command}  # fmt: skip
    with torch.inference_mode():
        for name, fn in paths.items():
            compiled = torch.compile(fn, dynamic=False)
            t0 = time.perf_counter()
            out = compiled(images[0])
            result[f"{name}_compile_s"] = round(time.perf_counter() - t0, 1)
            result[f"{name}_max_abs_diff"] = float((out - fn(images[0])).abs().max())
            result[f"{name}_eager_us"] = per_image_us(fn, images, args.repeats)
            result[f"{name}_compiled_us"] = per_image_us(compiled, images, args.repeats)
    for mode in ("eager", "compiled"):
        result[f"bound_{mode}"] = result[f"full_{mode}_us"] / result[f"front_{mode}_us"]
    print(f"batch {args.batch_size}, {result['images']} images, {result['threads']} threads, {result['cpu']['model']}")
    print("| path | eager us/image | compiled us/image | compile s | max diff |")
    print("|---|---:|---:|---:|---:|")
    for name in paths:
        print(f"| {name} | {result[f'{name}_eager_us']:.0f} | {result[f'{name}_compiled_us']:.0f} | "
              f"{result[f'{name}_compile_s']} | {result[f'{name}_max_abs_diff']:.1e} |")  # fmt: skip
    print(f"speed-up bound full / front: eager {result['bound_eager']:.2f}x, compiled {result['bound_compiled']:.2f}x")
    if args.json:
        write_json(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
