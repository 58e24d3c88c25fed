"""Classify image files with a trained controller + its backbone, each at the setting the controller picks.

    python -m policy.infer --policy runs/RUN IMAGE_OR_FOLDER [...]

Images (PNG/JPEG/BMP) are read with Pillow and the backbone's own preprocessing (its channels, L or RGB; resized to
its input size, or for a backbone with ``resize_size`` the shorter side resized and the centre cropped), then scaled
to [0, 1]. Fashion-MNIST images are light garments on a black background; other photos may need
inverting (--invert) to look like the training data.

A folder of any size streams through a DataLoader (``--workers`` processes decode while the model runs). Each batch
is also run at the full setting (``--no-full`` skips it) and the summary puts the two images/s side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from backbone.allocator import reuse_freed_memory
from backbone.data import FASHION_MNIST_CLASSES, IMAGE_SUFFIXES
from backbone.fileio import write_json
from backbone.folder_split import preprocessing
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from policy.load_run import load_classifier
from policy.stream import stream_predict


def collect_images(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded (sorted, recursively) to their image files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not out:
        raise ValueError(f"no image files found in {paths}")
    return out


def class_names(backbone) -> list[str]:
    names = getattr(backbone, "checkpoint_info", {}).get("classes")
    if names:
        return list(names)
    if backbone.cfg.num_classes == 10 and backbone.cfg.in_chans == 1:
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(backbone.cfg.num_classes)]


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy.infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="run folder written by train_policy.py (or its policy.json)")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--backbone", help="backbone file (default: the one recorded in policy.json)")
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=256, help="images per adaptive batch (default 256)"
    )
    parser.add_argument(
        "--workers", type=int_at_least(0), default=2, help="DataLoader processes decoding images (default 2)"
    )
    parser.add_argument(
        "--processes",
        type=int_at_least(1),
        default=1,
        help="classify in this many worker processes of one thread each (policy.core_pool; default 1: in this "
        "process with every torch thread); the reported compute time is then summed over them and divided by N",
    )
    parser.add_argument(
        "--no-full", action="store_true", help="skip timing the full setting on the same images (halves the work)"
    )
    parser.add_argument("--invert", action="store_true", help="invert gray levels (dark garment on light background)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not one line per image")
    parser.add_argument("--json", help="also write the per-image results to this JSON file")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    try:
        clf = load_classifier(args.policy, backbone=args.backbone)
        files = collect_images(args.images)
        result = stream_predict(
            clf,
            files,
            preprocessing(clf.backbone.cfg),
            args.batch_size,
            args.workers,
            args.invert,
            compare_full=not args.no_full,
            progress=sys.stderr.isatty(),
            processes=args.processes,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = class_names(clf.backbone)
    rows = []
    for f, label, setting, flops in zip(files, result.labels, result.settings, result.flops, strict=True):
        named = {k: v for k, v in setting._asdict().items() if v is not None}
        rows.append({"file": str(f), "label": label, "class": names[label], "setting": named, "flops": int(flops)})
    if not args.quiet:
        for r in rows:
            setting = " ".join(f"{k}={v}" for k, v in r["setting"].items())
            print(f"{r['file']}\t{r['label']} {r['class']}\t{setting}\t{r['flops'] / 1e6:.2f} MFLOPs")
    full = clf.grid.full_flops
    mean = float(np.mean([r["flops"] for r in rows]))
    print(
        f"{len(rows)} images: mean {mean / 1e6:.2f} MFLOPs/image (controller {clf.controller_flops / 1e6:.3f}) vs "
        f"{full / 1e6:.2f} for the full setting ({1 - mean / full:.1%} saved)"
    )
    speed = f"adaptive {result.images / result.adaptive_seconds:.0f} images/s"
    if result.full_seconds:
        speed += (
            f" vs full setting {result.images / result.full_seconds:.0f} images/s on the same images "
            f"({result.full_seconds / result.adaptive_seconds:.2f}x; same label as full on "
            f"{result.full_agrees / result.images:.1%})"
        )
    where = f"; {args.processes} worker processes" if args.processes > 1 else ""
    print(f"{speed} (compute only, decoding excluded; batch {args.batch_size}{where})")
    if args.json:
        write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
