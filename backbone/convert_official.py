"""Convert a released AdaPerceiver checkpoint into this package's backbone checkpoint format.

    python -m backbone.convert_official pjajal/adaperceiver-v1-in1k-ft checkpoints/adaperceiver_in1k.safetensors

SRC is a folder with the release's config.json + model.safetensors, a Hugging Face hub id (resolved through
huggingface_hub's cache), or a short name: in1k (pjajal/adaperceiver-v1-in1k-ft) or in12k (pjajal/adaperceiver-v1).
The output is a normal backbone checkpoint, so --backbone / --checkpoint accept it everywhere; its metadata records
the source, the sha256 of the source weights and the source config.json.
"""

from __future__ import annotations

import argparse
import sys

from backbone.checkpoint import save_backbone
from backbone.fileio import display_path
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.official import HUB_IDS, load_official


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbone.convert_official",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help=f"release folder, hub id, or one of {sorted(HUB_IDS)}")
    parser.add_argument("out", help="output .safetensors file (written atomically)")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder (default: huggingface_hub's)")
    parser.add_argument("--offline", action="store_true", help="never download: use the hub cache only")
    args = parser.parse_args(argv)
    try:
        model = load_official(args.src, cache_dir=args.cache_dir, local_files_only=True if args.offline else None)
        info = {
            "converted_from": HUB_IDS.get(args.src, args.src),
            "source_sha256": model.official_sha256,
            "source_config": model.official_config,
        }
        sha = save_backbone(model, args.out, metadata=info)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, grid = model.cfg, model.grid
    print(f"wrote {display_path(args.out)} (sha256 {sha}): {cfg.embed_dim}-wide, {cfg.depth} blocks, "
          f"{cfg.img_size}px patch {cfg.patch_size}, {len(grid)} settings "
          f"{grid.flops[grid.smallest_index] / 1e6:.1f} to {grid.full_flops / 1e6:.1f} MFLOPs")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
