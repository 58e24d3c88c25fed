"""How sharply the read cross-attention picks patches: a diagnostic of what the latents can learn from an image.

    python -m backbone.read_attention --checkpoint checkpoints/adaperceiver_fmnist.safetensors --split test

The read's queries do not depend on the input (one learned latent, told apart only by RoPE), so everything the
blocks see of an image is a set of attention-weighted averages of patch values. Broad attention (entropy near
``log(patches)``) and alike maps across latents mean those averages are close to one global pooling. Prints, per
head, the mean entropy of a latent's attention over the patches, the mean top-1 attention weight, and the mean
cosine similarity between the (image-averaged) attention maps of different latents; ``--json`` saves them.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass

import torch

from backbone.checkpoint import DEFAULT_BACKBONE, load_backbone
from backbone.fileio import display_path, write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.model import AdaPerceiver
from backbone.option_checks import int_at_least


@dataclass
class ReadAttentionStats:
    """Per-head figures (lists of length ``num_heads``) over ``samples`` images at ``num_tokens`` latents."""

    num_tokens: int
    num_patches: int
    samples: int
    uniform_entropy: float  # log(num_patches): the entropy of attention spread evenly over all patches
    entropy: list[float]  # mean entropy (nats) of one latent's attention over the patches
    top1_weight: list[float]  # mean largest attention weight of one latent
    latent_map_cosine: list[float]  # mean cosine between image-averaged maps of two different latents


@torch.no_grad()
def read_attention(model: AdaPerceiver, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Attention weights of the read, ``(B, heads, g, patches)``; rows sum to 1 (what SDPA computes inside)."""
    g, _, _ = model.resolve_setting(num_tokens, None, None)
    memory = model.embed(images)
    q = model.read.project_q(model.latent.expand(1, g, -1), model.rope)  # (1, heads, g, head_dim)
    k, _ = model.read_keys_values(memory)
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)


def read_attention_stats(
    model: AdaPerceiver, images: torch.Tensor, num_tokens: int | None = None
) -> ReadAttentionStats:
    """Summaries of :func:`read_attention` over a batch of images in [0, 1]."""
    attn = read_attention(model, images, num_tokens)
    b, _, g, p = attn.shape
    entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2))
    top1 = attn.amax(-1).mean(dim=(0, 2))
    maps = torch.nn.functional.normalize(attn.mean(0), dim=-1)  # (heads, g, patches)
    cosine = maps @ maps.transpose(-1, -2)
    off_diagonal = ~torch.eye(g, dtype=torch.bool)
    latent_cos = cosine[:, off_diagonal].mean(-1) if g > 1 else torch.ones(attn.shape[1])
    return ReadAttentionStats(g, p, b, math.log(p), entropy.tolist(), top1.tolist(), latent_cos.tolist())


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    from backbone.data import load_split

    parser = argparse.ArgumentParser(
        prog="python -m backbone.read_attention",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=str(DEFAULT_BACKBONE), help="backbone .safetensors file")
    parser.add_argument("--split", default="test", help="backbone-train | policy-train | test")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    parser.add_argument("--samples", type=int_at_least(1), default=512, help="first N images of the split")
    parser.add_argument(
        "--tokens", type=int_at_least(1), default=None, help="latent count (default: the largest granularity)"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        model = load_backbone(args.checkpoint).eval()
        data = load_split(args.split, args.data_dir).subset(args.samples)
        stats = read_attention_stats(model, data.as_float(), args.tokens)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read attention over {stats.num_patches} patches, {stats.num_tokens} latents, {stats.samples} images "
          f"of {args.split}; uniform entropy {stats.uniform_entropy:.2f} nats")  # fmt: skip
    for name in ("entropy", "top1_weight", "latent_map_cosine"):
        print(f"  {name:18s} per head: " + " ".join(f"{v:.3f}" for v in getattr(stats, name)))
    if args.json:
        command = "python -m backbone.read_attention " + " ".join(argv if argv is not None else sys.argv[1:])
        write_json(args.json, {**asdict(stats), "checkpoint": display_path(args.checkpoint), "split": args.split,
                               "sha256": model.checkpoint_sha256, "command": command})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
