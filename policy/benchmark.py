"""Wall-clock throughput of adaptive inference vs the full setting, both measured in the same run and passes.

    python -m policy.benchmark --policy runs/RUN [--batch-sizes 256 1] [--repeats 9]

For each batch size: images/s of ``AdaptiveClassifier.predict`` (observation, controller, grouped runs) and of
the plain full-setting forward on the same test images, timed back to back in each of ``--repeats`` paired passes
(after a warm-up); the speedup is the median of the per-pass ratios, shown next to the FLOPs ratio full / adaptive
(controller overhead included). Pairing matters on a shared machine, whose speed drifts by tens of percent.
The front alone (embedding, probe and controller: what every image pays before its setting runs) is timed in the
same passes; full / front bounds the speed-up with this front, however fast the rest ran.
The machine's fp32 matmul rate is measured in the same run, so the full setting's GFLOP/s can be read against it.
With ``--processes N`` the batches (> 1) run in N worker processes, one thread each (``policy.core_pool``), the
way adaptive inference uses several cores best; the full setting is timed both there and in this process with all
its threads, and each pass's speed-up is taken against the faster of the two. Prints a table and writes JSON."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
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
from policy.core_pool import CorePool
from policy.load_run import load_classifier
from policy.sequential_inference import SequentialClassifier
from policy.sidecar import resolve_run


def _in_process(fn: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor, int], float]:
    return lambda images, batch: images_per_second(fn, images, batch)


def _in_pool(pool: CorePool, method: str) -> Callable[[torch.Tensor, int], float]:
    """images/s of ``method`` over all the batches streamed through the pool (the workers run them concurrently)."""

    def rate(images: torch.Tensor, batch: int) -> float:
        batches = [images[s : s + batch] for s in range(0, len(images), batch)]
        t0 = time.perf_counter()
        for _ in pool.map(method, batches):
            pass
        return len(images) / (time.perf_counter() - t0)

    return rate


def _in_process_figures(full: list, full_here: list, adaptive_here: list, flops_ratio: float) -> dict:
    """A pooled row's in-process timings from the same passes: the pool's gain is read against them."""
    speedup = statistics.median([a / f for a, f in zip(adaptive_here, full_here, strict=True)])
    return {
        "full_pool_img_s_runs": full,
        "full_in_process_img_s_runs": full_here,
        "adaptive_in_process_img_s_runs": adaptive_here,
        "speedup_in_process": speedup,
        "speedup_in_process_over_flops_ratio": speedup / flops_ratio,
    }


def benchmark(
    clf: AdaptiveClassifier | SequentialClassifier,
    images: torch.Tensor,
    batch_sizes: list[int],
    repeats: int,
    pool: CorePool | None = None,
) -> dict:
    """Paired timings per batch size; with ``pool``, every path runs in its worker processes (batches > 1) and the
    full setting is also timed in this process, the speed-up taken against the faster of its two ways."""
    full_flops = clf.grid.full_flops
    with torch.inference_mode():
        adaptive_flops = float(clf.predict(images).flops.mean())
    rows = []
    for batch in batch_sizes:
        # paired measurements: each repeat times both back to back (alternating which goes first), so a slow
        # spell of the shared machine hits both; the reported speedup is the median of the per-repeat ratios
        # the front (embedding, probe, controller: what every image pays before its setting runs) is timed too:
        # full / front is the speed-up the adaptive path would reach if everything after the decision were free
        pooled = pool is not None and batch > 1  # one image's latency cannot be split across processes
        full, adaptive, front, full_here, adaptive_here = [], [], [], [], []
        if pooled:  # both paths in the pool and, for the pool's gain in the same passes, both in this process
            pair = [(full, _in_pool(pool, "full")), (adaptive, _in_pool(pool, "predict"))]
            pair += [(front, _in_pool(pool, "front")), (full_here, _in_process(clf.backbone))]
            pair.append((adaptive_here, _in_process(clf.predict)))
        else:
            pair = [(full, _in_process(clf.backbone)), (adaptive, _in_process(clf.predict))]
            pair.append((front, _in_process(clf.front)))
        for _, rate in pair:  # warm-up pass each (allocator, kernels), not timed
            rate(images[: max(batch, len(images) // 4)], batch)
        for r in range(repeats):
            for runs, rate in pair if r % 2 == 0 else pair[::-1]:
                runs.append(rate(images, batch))
        # the full setting's faster way in each pass (in the pool or in this process with every thread)
        fastest = [max(f, h) for f, h in zip(full, full_here, strict=True)] if pooled else full
        speedups = [a / f for a, f in zip(adaptive, fastest, strict=True)]
        speedup, ratio = statistics.median(speedups), full_flops / adaptive_flops
        bound = statistics.median([c / f for c, f in zip(front, fastest, strict=True)])
        rows.append(
            {
                "images": len(images),
                "adaptive_mean_flops": adaptive_flops,
                "batch_size": batch,
                "processes": pool.processes if pooled else 1,
                "full_img_s": statistics.median(fastest),
                "full_gflops_per_s": statistics.median(fastest) * full_flops / 1e9,
                "adaptive_img_s": statistics.median(adaptive),
                "speedup": speedup,
                "speedup_min": min(speedups),
                "speedup_max": max(speedups),
                "flops_ratio": ratio,
                "speedup_over_flops_ratio": speedup / ratio,
                "front_img_s": statistics.median(front),
                "speedup_bound_from_front": bound,
                "full_img_s_runs": fastest,
                **(_in_process_figures(full, full_here, adaptive_here, ratio) if pooled else {}),
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
        "--processes",
        type=int_at_least(1),
        default=1,
        help="run batches > 1 in this many worker processes with one thread each (policy.core_pool.CorePool); the "
        "full setting is then also timed in this process and the speed-up taken against its faster way (default 1)",
    )
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
    pool = CorePool(clf, args.processes, batch_size=max(args.batch_sizes)) if args.processes > 1 else None
    with pool or contextlib.nullcontext():
        for batch in args.batch_sizes:
            subset = images[: args.limit_batch1] if batch == 1 else images
            results.append(benchmark(clf, subset, [batch], args.repeats, pool))
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
        "| batch | processes | full img/s | full % of matmul | adaptive img/s | speedup (min-max) | FLOPs ratio "
        "| speedup / FLOPs ratio | front alone: speedup bound (/ FLOPs ratio) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        r["full_fraction_of_matmul"] = r["full_gflops_per_s"] / matmul
        print(
            f"| {r['batch_size']} | {r['processes']} | {r['full_img_s']:.0f} | {r['full_fraction_of_matmul']:.1%} | "
            f"{r['adaptive_img_s']:.0f} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{r['flops_ratio']:.2f}x | {r['speedup_over_flops_ratio']:.0%} | "
            f"{r['speedup_bound_from_front']:.2f}x ({r['speedup_bound_from_front'] / r['flops_ratio']:.0%}) |"
        )
    for r in out["rows"]:
        if r["processes"] > 1:
            print(
                f"batch {r['batch_size']} in this process alone, same passes: {r['speedup_in_process']:.2f}x "
                f"({r['speedup_in_process_over_flops_ratio']:.0%} of the FLOPs ratio)"
            )
    path = Path(args.json) if args.json else Path(args.policy) / "benchmark.json"
    write_json(path, out, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
