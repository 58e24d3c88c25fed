"""Wall-clock throughput of adaptive inference vs the full setting, measured in one process and one run.

    python -m policy.benchmark --policy runs/RUN [--batch-sizes 256 1] [--repeats 9]

For each batch size: images/s of ``AdaptiveClassifier.predict`` (observation, controller, grouped runs) and of
the plain full-setting forward on the same test images, timed back to back in each of ``--repeats`` paired passes
(after a warm-up); the speedup is the median of the per-pass ratios, shown next to the FLOPs ratio full / adaptive
(controller overhead included). Pairing matters on a shared machine, whose speed drifts by tens of percent.
The front alone (embedding, probe and controller: what every image pays before its setting runs) is timed in the
same passes; full / front bounds the speed-up with this front, however fast the rest ran.
The machine's fp32 matmul rate is measured in the same run, so the full setting's GFLOP/s can be read against it.
Prints a table and writes JSON."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from backbone.allocator import reuse_freed_memory
from backbone.data import DataError
from backbone.data_source import resolve_data
from backbone.fileio import write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from benchmarks.timing import cpu_description, images_per_second, matmul_gflops
from policy.adaptive import AdaptiveClassifier
from policy.load_run import load_classifier
from policy.sequential_inference import SequentialClassifier
from policy.sidecar import resolve_run


def benchmark(
    clf: AdaptiveClassifier | SequentialClassifier, images: torch.Tensor, batch_sizes: list[int], repeats: int
) -> dict:
    full_flops = clf.grid.full_flops
    with torch.inference_mode():
        adaptive_flops = float(clf.predict(images).flops.mean())
    rows = []
    for batch in batch_sizes:
        # paired measurements: each repeat times both back to back (alternating which goes first), so a slow
        # spell of the shared machine hits both; the reported speedup is the median of the per-repeat ratios
        # the front (embedding, probe, controller: what every image pays before its setting runs) is timed too:
        # full / front is the speed-up the adaptive path would reach if everything after the decision were free
        full, adaptive, front = [], [], []
        pair = [(full, clf.backbone), (adaptive, clf.predict), (front, clf.front)]
        for _, fn in pair:  # warm-up pass each (allocator, kernels), not timed
            images_per_second(fn, images[: max(batch, len(images) // 4)], batch)
        for r in range(repeats):
            for runs, fn in pair if r % 2 == 0 else pair[::-1]:
                runs.append(images_per_second(fn, images, batch))
        speedups = [a / f for a, f in zip(adaptive, full, strict=True)]
        speedup, ratio = statistics.median(speedups), full_flops / adaptive_flops
        bound = statistics.median([c / f for c, f in zip(front, full, strict=True)])
        rows.append(
            {
                "images": len(images),
                "adaptive_mean_flops": adaptive_flops,
                "batch_size": batch,
                "full_img_s": statistics.median(full),
                "full_gflops_per_s": statistics.median(full) * full_flops / 1e9,
                "adaptive_img_s": statistics.median(adaptive),
                "speedup": speedup,
                "speedup_min": min(speedups),
                "speedup_max": max(speedups),
                "flops_ratio": ratio,
                "speedup_over_flops_ratio": speedup / ratio,
                "front_img_s": statistics.median(front),
                "speedup_bound_from_front": bound,
                "full_img_s_runs": full,
                "adaptive_img_s_runs": adaptive,
                "front_img_s_runs": front,
            }
        )
    return {
        "full_flops": full_flops,
        "adaptive_mean_flops": adaptive_flops,
        "images": len(images),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="run folder written by train_policy.py")
    parser.add_argument("--split", default="test", help="images to run (default: test)")
    parser.add_argument(
        "--limit", type=int_at_least(1), default=2048, help="first N images of the split (default 2048)"
    )
    parser.add_argument(
        "--limit-batch1", type=int_at_least(1), default=256, help="images for batch size 1 (default 256)"
    )
    parser.add_argument("--batch-sizes", type=int_at_least(1), nargs="+", default=[256, 1], help="default: 256 1")
    parser.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=9,
        help="paired timed passes per batch size (medians reported; default 9)",
    )
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = torch default)")
    parser.add_argument(
        "--data", help="fmnist or an image-folder root ROOT/<split>/<class>/<image> (default: the run's own data)"
    )
    parser.add_argument("--data-dir", help="Fashion-MNIST folder")
    parser.add_argument("--workers", type=int_at_least(0), default=2, help="DataLoader workers reading image folders")
    parser.add_argument(
        "--matmul-size", type=int_at_least(1), default=2048, help="side of the square fp32 matmul (default 2048)"
    )
    parser.add_argument("--json", default=None, help="output JSON (default: <policy>/benchmark.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()
    try:
        clf = load_classifier(args.policy)
        source = resolve_data(args.data or resolve_run(args.policy)[1].get("data"), args.data_dir)
        source.check_backbone(clf.backbone)
        if source.builtin:
            data = source.dataset(args.split)
        else:
            folder = source.split(args.split, clf.backbone)
            data = folder.subset(min(args.limit, len(folder))).read_all(workers=args.workers)[0]
        images = data.subset(min(args.limit, len(data))).as_float()
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    matmul = matmul_gflops(args.matmul_size, args.repeats)
    results = []
    for batch in args.batch_sizes:
        subset = images[: args.limit_batch1] if batch == 1 else images
        results.append(benchmark(clf, subset, [batch], args.repeats))
    out = {
        **results[0],
        "rows": [r for res in results for r in res["rows"]],
        "matmul_size": args.matmul_size,
        "matmul_gflops_per_s": matmul,
        "cpu": cpu_description(),
        "policy": args.policy,
        "split": args.split,
        "repeats": args.repeats,
        "command": "python -m policy.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(
        f"adaptive mean {out['adaptive_mean_flops'] / 1e6:.2f} MFLOPs/image vs full {out['full_flops'] / 1e6:.2f}"
        f" ({out['threads']} threads, torch {out['torch']}, median of {args.repeats})"
    )
    print(f"fp32 matmul ({args.matmul_size}^2): {matmul:.1f} GFLOP/s")
    print(
        "| batch | full img/s | full % of matmul | adaptive img/s | speedup (min-max) | FLOPs ratio "
        "| speedup / FLOPs ratio | front alone: speedup bound (/ FLOPs ratio) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        r["full_fraction_of_matmul"] = r["full_gflops_per_s"] / matmul
        print(
            f"| {r['batch_size']} | {r['full_img_s']:.0f} | {r['full_fraction_of_matmul']:.1%} | "
            f"{r['adaptive_img_s']:.0f} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{r['flops_ratio']:.2f}x | {r['speedup_over_flops_ratio']:.0%} | "
            f"{r['speedup_bound_from_front']:.2f}x ({r['speedup_bound_from_front'] / r['flops_ratio']:.0%}) |"
        )
    path = Path(args.json) if args.json else Path(args.policy) / "benchmark.json"
    write_json(path, out, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
