"""Write a Fashion-MNIST split as PNG files ``OUT/<split>/<class>/<index>.png``.

A real folder of images to try what reads folders on: ``python -m policy.infer --policy RUN OUT/test`` (streaming
inference next to the full setting) or ``--data OUT`` (with ``--splits train test``).

    python scripts/export_image_folder.py --out /tmp/fmnist_png [--splits test] [--limit 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from backbone.data import FASHION_MNIST_CLASSES, DataError, load_split
from backbone.option_checks import int_at_least

FOLDER_OF = {"backbone-train": "train", "policy-train": "policy-train", "test": "test"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="root folder to write into")
    parser.add_argument("--splits", nargs="+", default=["test"], choices=list(FOLDER_OF), help="splits to write")
    parser.add_argument("--limit", type=int_at_least(0), default=0, help="first N images of each split only (0 = all)")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    args = parser.parse_args(argv)
    try:
        for split in args.splits:
            data = load_split(split, args.data_dir)
            data = data.subset(args.limit) if args.limit else data
            root = Path(args.out) / FOLDER_OF[split]
            for name in FASHION_MNIST_CLASSES:
                (root / name.replace("/", "-")).mkdir(parents=True, exist_ok=True)
            for i in tqdm(range(len(data)), desc=split, unit="img"):
                name = FASHION_MNIST_CLASSES[int(data.labels[i])].replace("/", "-")
                Image.fromarray(data.images[i, 0].numpy(), "L").save(root / name / f"{i:05d}.png")
            print(f"wrote {len(data)} images to {root}")
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
