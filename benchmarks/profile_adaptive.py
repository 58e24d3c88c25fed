"""Where adaptive inference spends its time: ``torch.profiler`` and ``cProfile`` tables of ``predict``.

    python -m benchmarks.profile_adaptive --policy docs/results/demo_p0.3 --batch-size 256 [--out FILE]

Runs ``AdaptiveClassifier.predict`` over the first ``--images`` test images in batches of ``--batch-size`` (after
one untimed warm-up pass), once under ``torch.profiler`` (operators by self CPU time: what the kernels cost) and
once under ``cProfile`` (Python functions by own time: the per-call overhead around them). The operator table
also gives the number of calls per image, the count that dominates at batch 1.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from backbone.allocator import reuse_freed_memory
from backbone.data_source import resolve_data
from backbone.interrupt import exits_cleanly_on_ctrl_c
from policy.adaptive import AdaptiveClassifier
from policy.sidecar import resolve_run

# predict's phases: embedding + probe + controller, then per group the stem continuation, read, blocks and write
PHASES = r"\((predict|embed|run_probe|choose|continue_embed|read_latents|_run_blocks|forward_head)\)"


def _run_all(clf: AdaptiveClassifier, images: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            clf.predict(images[s : s + batch])


def profile_tables(clf: AdaptiveClassifier, images: torch.Tensor, batch: int, rows: int) -> str:
    """Markdown-ish report: wall time, the operator table and the Python-function table."""
    _run_all(clf, images, batch)  # warm-up: allocator, oneDNN primitives
    t0 = time.perf_counter()
    _run_all(clf, images, batch)
    seconds = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _run_all(clf, images, batch)
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    profiler = cProfile.Profile()
    profiler.enable()
    _run_all(clf, images, batch)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(rows)
    phases = io.StringIO()  # where predict's time goes, phase by phase (cumulative, profiler overhead included)
    pstats.Stats(profiler, stream=phases).sort_stats("cumulative").print_stats(PHASES)
    return (
        f"{len(images)} images, batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
        f"unprofiled: {len(images) / seconds:.0f} images/s ({1e3 * seconds / len(images) * batch:.2f} ms/batch)\n"
        f"operator calls (nested ones included): {calls / len(images):.1f} per image\n\n"
        "## torch.profiler, operators by self CPU time\n\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=rows)
        + "\n## cProfile, Python functions by own time\n\n"
        + stream.getvalue()
        + "\n## cProfile, the phases of predict by cumulative time\n\n"
        + phases.getvalue()
    )


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_adaptive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="docs/results/demo_p0.3", help="run folder written by train_policy.py")
    parser.add_argument("--batch-size", type=int, default=256, help="images per predict call (default 256)")
    parser.add_argument("--images", type=int, default=0, help="test images to run (default: 2048, or 256 at batch 1)")
    parser.add_argument("--rows", type=int, default=30, help="rows of each table (default 30)")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: the usual search)")
    parser.add_argument("--out", help="also write the report to this text file")
    args = parser.parse_args(argv)
    reuse_freed_memory()  # as the inference commands do
    try:
        clf = AdaptiveClassifier.load(args.policy)
        source = resolve_data(resolve_run(args.policy)[1].get("data"), args.data_dir)
        n = args.images or (256 if args.batch_size == 1 else 2048)
        images = source.dataset("test").subset(n).as_float()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m benchmarks.profile_adaptive " + " ".join(argv if argv is not None else sys.argv[1:])
    report = f"command: {command}\n" + profile_tables(clf, images, args.batch_size, args.rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
