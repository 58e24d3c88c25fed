"""Why the conv stem and the patch context keep channels-last weights: a run's ``predict`` timed in both layouts.

oneDNN picks its NHWC kernels when a convolution's weights are channels-last (``ConvStem`` and ``PatchContext``
convert theirs when built). This loads a run twice, puts the second copy's 4-D weights back in NCHW, and times
``AdaptiveClassifier.predict`` and the full setting on the same test images in paired passes (alternating which
goes first) in one process; it checks that both layouts give the same labels::

    python -m benchmarks.stem_layout --policy docs/results/cascade_p0.3 [--batch-size 256] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from backbone.allocator import reuse_freed_memory
from backbone.data import DataError
from backbone.data_source import resolve_data
from backbone.fileio import write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from benchmarks.timing import cpu_description, images_per_second
from policy.adaptive import AdaptiveClassifier
from policy.sidecar import resolve_run


def compare_layouts(policy: str, images: torch.Tensor, batch: int, repeats: int) -> dict:
    """images/s of predict and of the full setting with channels-last (as built) and NCHW weights, paired."""
    built, nchw = AdaptiveClassifier.load(policy), AdaptiveClassifier.load(policy)
    nchw.backbone.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        a, b = built.predict(images), nchw.predict(images)
        same_labels = bool(torch.equal(a.labels, b.labels))
        logit_diff = float((a.logits - b.logits).abs().max())
    paths = {
        "predict_channels_last": built.predict,
        "predict_nchw": nchw.predict,
        "full_channels_last": built.backbone,
        "full_nchw": nchw.backbone,
    }
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():  # warm-up: oneDNN primitives, allocator
        images_per_second(fn, images[: 2 * batch], batch)
    for r in range(repeats):
        for name, fn in list(paths.items())[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(images_per_second(fn, images, batch))

    def paired(fast: str, slow: str) -> float:
        return statistics.median(f / s for f, s in zip(runs[fast], runs[slow], strict=True))

    return {
        "same_labels": same_labels,
        "max_abs_logit_diff": logit_diff,
        "img_s": {name: statistics.median(v) for name, v in runs.items()},
        "img_s_runs": runs,
        "predict_speedup": paired("predict_channels_last", "predict_nchw"),
        "full_speedup": paired("full_channels_last", "full_nchw"),
    }


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stem_layout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="docs/results/cascade_p0.3", help="run folder written by train_policy.py")
    parser.add_argument("--images", type=int_at_least(1), default=2048, help="test images (default 2048)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=256, help="images per call (default 256)")
    parser.add_argument(
        "--repeats", type=int_at_least(1), default=9, help="paired timed passes (median reported; default 9)"
    )
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: the usual search)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    reuse_freed_memory()  # as the inference commands do
    try:
        source = resolve_data(resolve_run(args.policy)[1].get("data"), args.data_dir)
        images = source.dataset("test").subset(args.images).as_float()
        result = compare_layouts(args.policy, images, args.batch_size, args.repeats)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.policy}: {len(images)} test images, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print("| path | channels-last img/s | NCHW img/s | speed-up (paired median) |\n|---|---:|---:|---:|")
    for path in ("predict", "full"):
        cl, nchw = result["img_s"][f"{path}_channels_last"], result["img_s"][f"{path}_nchw"]
        print(f"| {path} | {cl:.0f} | {nchw:.0f} | {result[f'{path}_speedup']:.3f}x |")
    print(f"same labels: {result['same_labels']}; largest logit difference {result['max_abs_logit_diff']:.1e}")
    if args.json:
        command = "python -m benchmarks.stem_layout " + " ".join(argv if argv is not None else sys.argv[1:])
        meta = {"command": command, "policy": args.policy, "images": len(images), "batch_size": args.batch_size,
                "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "cpu": cpu_description()}  # fmt: skip
        write_json(args.json, {**meta, **result}, indent=1)
    return 0 if result["same_labels"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
