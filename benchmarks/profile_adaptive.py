"""Where adaptive inference spends its time: predict's phases by wall clock, then ``torch.profiler`` and ``cProfile``.

    python -m benchmarks.profile_adaptive --policy docs/results/demo_p0.3 --batch-size 256 [--out FILE]

Runs ``AdaptiveClassifier.predict`` over the first ``--images`` test images in batches of ``--batch-size`` (after
one untimed warm-up pass): first with a ``perf_counter`` around each of its phases and no profiler (the phase
table: profilers inflate some operators, e.g. the stem's GELU on a 28x28 map shows 1.2 ms under ``torch.profiler``
against 0.26 ms timed directly), then once under ``torch.profiler`` (operators by self CPU time: what the kernels
cost) and once under ``cProfile`` (Python functions by own time: the per-call overhead around them). The operator
table also gives the number of calls per image, the count that dominates at batch 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import io
import pstats
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from backbone.allocator import reuse_freed_memory
from backbone.data_source import resolve_data
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from envs import observations
from policy.adaptive import AdaptiveClassifier
from policy.sidecar import resolve_run

# predict's phases: embedding + probe + controller, then per group the stem continuation, read, blocks and write
PHASES = r"\((predict|embed|run_probe|choose|continue_embed|read_latents|_run_blocks|forward_head)\)"


def _phase_owners(clf: AdaptiveClassifier) -> list[tuple[str, object, str]]:
    """(phase, object, attribute) of the functions predict does its work in; nested ones count in both (the probe's
    read and write-out are also in "reads" and "write-outs")."""
    model = clf.backbone
    return [
        ("stage-0 embedding", observations, "observe_embed"),
        ("probe (read, block, write-out)", observations, "run_probe"),
        ("controller", clf, "choose"),
        ("stem continuation", model, "continue_embed"),
        ("reads (the probe's included)", model, "read_latents"),
        ("blocks", clf, "_run_blocks"),
        ("write-outs (the probe's included)", model, "forward_head"),
    ]


@contextlib.contextmanager
def timed_phases(clf: AdaptiveClassifier) -> Iterator[collections.Counter]:
    """Wrap each phase's function with a ``perf_counter`` (seconds summed per phase, inclusive) while inside;
    the originals are put back on exit."""
    seconds: collections.Counter = collections.Counter()
    saved = []
    for phase, owner, name in _phase_owners(clf):
        original = getattr(owner, name)
        saved.append((owner, name, original, name in vars(owner)))

        def timed(*args, _f=original, _phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                seconds[_phase] += time.perf_counter() - t0

        setattr(owner, name, functools.wraps(original)(timed))
    try:
        yield seconds
    finally:
        for owner, name, original, own in saved:
            if own:  # a module's function: put it back
                setattr(owner, name, original)
            else:  # an instance attribute over a class's method: remove it
                delattr(owner, name)


def phase_table(clf: AdaptiveClassifier, images: torch.Tensor, batch: int, repeats: int = 3) -> str:
    """predict's phases as % of its wall time over ``repeats`` passes (after the warm-up pass), no profiler."""
    with timed_phases(clf) as seconds:
        t0 = time.perf_counter()
        for _ in range(repeats):
            _run_all(clf, images, batch)
        total = time.perf_counter() - t0
    batches = repeats * -(-len(images) // batch)
    lines = ["| phase | % of predict | ms per batch |", "|---|---:|---:|"]
    order = [phase for phase, _, _ in _phase_owners(clf) if phase in seconds]  # predict's order, not first-call order
    lines += [f"| {p} | {100 * seconds[p] / total:.1f}% | {1e3 * seconds[p] / batches:.3f} |" for p in order]
    return "\n".join([*lines, f"| predict | 100% | {1e3 * total / batches:.3f} |"]) + "\n"


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
    phases = phase_table(clf, images, batch)
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
    cumulative = io.StringIO()  # the same phases by cProfile's cumulative time (its overhead included)
    pstats.Stats(profiler, stream=cumulative).sort_stats("cumulative").print_stats(PHASES)
    return (
        f"{len(images)} images, batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
        f"unprofiled: {len(images) / seconds:.0f} images/s ({1e3 * seconds / len(images) * batch:.2f} ms/batch)\n"
        f"operator calls (nested ones included): {calls / len(images):.1f} per image\n\n"
        "## predict's phases by wall clock (perf_counter, no profiler; nested phases count in both)\n\n"
        + phases
        + "\n## torch.profiler, operators by self CPU time\n\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=rows)
        + "\n## cProfile, Python functions by own time\n\n"
        + stream.getvalue()
        + "\n## cProfile, the phases of predict by cumulative time (its overhead included)\n\n"
        + cumulative.getvalue()
    )


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_adaptive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="docs/results/demo_p0.3", help="run folder written by train_policy.py")
    parser.add_argument("--batch-size", type=int_at_least(1), default=256, help="images per predict call (default 256)")
    parser.add_argument(
        "--images", type=int_at_least(0), default=0, help="test images to run (default: 2048, or 256 at batch 1)"
    )
    parser.add_argument("--rows", type=int_at_least(1), default=30, help="rows of each table (default 30)")
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
