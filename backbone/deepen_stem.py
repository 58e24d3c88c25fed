"""Give a trained backbone's input adapter one more convolution, as a new deepest input stage.

    python -m backbone.deepen_stem --channels 128 --out runs/deepened.safetensors
    python -m backbone.train init=runs/deepened.safetensors epochs=4 lr=1e-3 warmup_epochs=0.25 out=runs/deepened_ft

Why: on the default backbone the accuracy is bought by the depth of the input adapter, and the top of the front is
flat past stage 3 (every stage-3 setting within 0.5 points): a controller then has nothing above the cheap settings
to reach for (issue 20's iso-accuracy). A deeper stage on top of the trained ones is a cheap way to ask whether
one more convolution lifts the top, without retraining from scratch.

Every old setting keeps its logits exactly: the old deepest projection becomes the exit after the old last
convolution (an exit is AvgPool + 1x1 conv, and on the patch grid the pooling is the identity). The new 3x3
convolution (stride 1, on the patch grid) starts as the identity on the old channels (plus a little noise, so the
extra channels are not dead) and the new projection as the old one on those channels, so the new stage starts
near the old deepest one (it differs by one more GELU); ``backbone.train init=OUT`` then trains all stages
together. The output's metadata records the source checkpoint's sha256 and the new stage's width.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from backbone.checkpoint import DEFAULT_BACKBONE, load_backbone, save_backbone
from backbone.fileio import display_path
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.model import AdaPerceiver
from backbone.option_checks import int_at_least

INIT_NOISE = 0.01  # std of the noise on the new convolution's near-identity start


def deepen_stem(model: AdaPerceiver, channels: int, seed: int = 0) -> AdaPerceiver:
    """A copy of ``model`` with one more 3x3 stem convolution (``channels`` wide, stride 1) as its deepest stage."""
    cfg = model.cfg
    if cfg.stem != "conv":
        raise ValueError(f"deepen_stem needs a conv stem (stem: conv), got stem={cfg.stem!r}")
    old_convs = len(cfg.stem_dims)
    old_width = cfg.stem_dims[-1]
    if cfg.stem_side(old_convs) != cfg.img_size // cfg.patch_size:
        raise ValueError(
            f"deepen_stem needs the stem's last convolution on the patch grid (its projection 1x1), got a "
            f"{cfg.stem_side(old_convs)}-pixel map for a {cfg.img_size // cfg.patch_size}-patch grid"
        )
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < old_width:
        raise ValueError(f"channels must be an integer >= the stem's last width ({old_width}), got {channels!r}")
    new_cfg = dataclasses.replace(
        cfg,
        stem_dims=(*cfg.stem_dims, channels),
        stem_strides=(*cfg.conv_stem_strides, 1),
        stem_exits=(*cfg.stem_exits, old_convs),
    )
    deeper = AdaPerceiver(new_cfg)
    old = model.state_dict()
    state = {k: v for k, v in old.items() if not k.startswith("stem.proj.")}
    exit_prefix = f"stem.exits.{len(cfg.stem_exits)}.1."  # the new exit after the old last conv: AvgPool, then 1x1
    state.update({exit_prefix + k.removeprefix("stem.proj."): v for k, v in old.items() if k.startswith("stem.proj.")})
    conv = f"stem.convs.{2 * old_convs}."  # (conv, GELU) pairs in one nn.Sequential
    generator = torch.Generator().manual_seed(seed)
    weight = INIT_NOISE * torch.randn(channels, old_width, 3, 3, generator=generator)
    weight[torch.arange(old_width), torch.arange(old_width), 1, 1] += 1.0
    state[conv + "weight"], state[conv + "bias"] = weight, torch.zeros(channels)
    proj = torch.zeros_like(deeper.state_dict()["stem.proj.weight"])
    proj[:, :old_width] = old["stem.proj.weight"]
    state["stem.proj.weight"], state["stem.proj.bias"] = proj, old["stem.proj.bias"].clone()
    deeper.load_state_dict(state, strict=True)
    return deeper.to(next(model.parameters()).device).train(model.training)


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbone.deepen_stem",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=str(DEFAULT_BACKBONE), help="trained backbone to deepen")
    parser.add_argument(
        "--channels", type=int_at_least(1), default=128, help="width of the new convolution (>= the last one's)"
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the new convolution's start noise")
    parser.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    args = parser.parse_args(argv)
    try:
        model = load_backbone(args.checkpoint)
        deeper = deepen_stem(model, args.channels, args.seed)
        info = {"deepened_from": model.checkpoint_sha256, "new_stem_channels": args.channels, "seed": args.seed}
        sha = save_backbone(deeper, args.out, metadata=info)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid = deeper.grid
    smallest, full = grid.flops[grid.smallest_index] / 1e6, grid.full_flops / 1e6
    print(f"wrote {display_path(args.out)} (sha256 {sha}): stages {deeper.cfg.stages} (stem convs run), "
          f"{len(grid)} settings {smallest:.1f} to {full:.1f} MFLOPs")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
