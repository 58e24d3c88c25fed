"""Build (or finish) the outcome tables a controller needs, e.g. on a GPU machine before ``train_policy.py``.

    python -m envs.build_tables --backbone B.safetensors --data ROOT [--splits policy-train test] [--device cuda]

Each table lands in the cache that ``train_policy.py``, the environment and the ablation read (``--cache-dir``,
default ``$ADAPERCEIVER_CACHE_DIR`` or ``~/.cache/adaperceiver-rl/tables``). Image-folder tables are built in chunks
written atomically: after Ctrl-C or a crash, rerun the same command and it continues with the next chunk.

Several processes each build their shard and rank 0 writes the same table under the same cache key:

    torchrun --nproc_per_node N -m envs.build_tables --backbone B.safetensors --data ROOT [--device cuda]
"""

from __future__ import annotations

import argparse
import sys

from backbone.checkpoint import DEFAULT_BACKBONE, CheckpointError, load_backbone
from backbone.data import SPLITS, DataError
from backbone.data_source import resolve_data
from backbone.distributed import is_main, local_device, process_group
from backbone.interrupt import EXIT_INTERRUPTED
from backbone.option_checks import int_at_least
from envs.observations import DEFAULT_OBSERVATION, OBSERVATIONS
from envs.outcome_table import CHUNK_SIZE
from envs.sharded_table import load_or_build_sharded

TORCHRUN_HELP = """several processes: torchrun --nproc_per_node N -m envs.build_tables [same options]
  (add --nnodes M --node_rank R --rdzv_endpoint HOST:PORT on each of M machines). Each process builds its shard
  (whole batches of Fashion-MNIST, whole chunks of an image folder) and rank 0 writes the table to the same file
  and cache key as one process; with the same --chunk-size the table is identical. --device cuda gives each process
  its own GPU. An image folder's chunks go next to the table: --cache-dir must be on a filesystem every machine sees."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m envs.build_tables",
        description=__doc__.split("\n\n")[0],
        epilog=TORCHRUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbone", default=str(DEFAULT_BACKBONE), help="backbone .safetensors (default: shipped)")
    parser.add_argument("--data", help="fmnist (default) or an image-folder root ROOT/<split>/<class>/<image>")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    parser.add_argument("--splits", nargs="+", default=["policy-train", "test"], choices=SPLITS, help="splits")
    parser.add_argument("--observation", default=DEFAULT_OBSERVATION, choices=sorted(OBSERVATIONS))
    parser.add_argument("--device", default="cpu", help="torch device of the backbone while building (e.g. cuda)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=500, help="images per forward pass")
    parser.add_argument(
        "--workers", type=int_at_least(0), default=2, help="DataLoader worker processes reading image folders"
    )
    parser.add_argument("--limit", type=int_at_least(0), default=0, help="first N images of each split only (0 = all)")
    parser.add_argument("--chunk-size", type=int_at_least(1), default=CHUNK_SIZE,
                        help=f"image folders: images per chunk file, the unit of resumption and of sharding over "
                        f"torchrun's processes (default {CHUNK_SIZE})")  # fmt: skip
    parser.add_argument("--cache-dir", help="outcome-table cache folder")
    args = parser.parse_args(argv)
    with process_group(args.device):
        return _build(args)


def _build(args: argparse.Namespace) -> int:
    """Build each split's table (sharded over torchrun's processes, if any); rank 0 prints the summaries."""
    try:
        source = resolve_data(args.data, args.data_dir)
        model = load_backbone(args.backbone)
        source.check_backbone(model)
        for split in args.splits:
            dataset = source.dataset(split) if source.builtin else source.split(split, model)
            if args.limit:
                dataset = dataset.subset(args.limit)
            table = load_or_build_sharded(model, split, dataset, args.observation, cache_dir=args.cache_dir,
                                          batch_size=args.batch_size, device=local_device(args.device),
                                          workers=args.workers, chunk_size=args.chunk_size)  # fmt: skip
            if table is None:  # another rank's table: rank 0 reports
                continue
            full = float(table.accuracy()[table.grid.full_index])
            print(f"{split}: {len(table)} images, full setting {full:.2%}, smallest "
                  f"{float(table.accuracy()[(0,) * table.grid.ndim]):.2%}")  # fmt: skip
    except (ValueError, FileNotFoundError, DataError, CheckpointError, RuntimeError) as e:
        if is_main():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if is_main():
            print("interrupted: finished tables and chunks are kept; rerun the same command to continue",
                  file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
