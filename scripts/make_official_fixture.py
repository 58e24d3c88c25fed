"""Generate the parity fixture of ``backbone.load_official`` from the public AdaPerceiver code (issue 19).

Usage: ``python scripts/make_official_fixture.py PATH_TO_ADAPERCEIVER_PUBLIC OUT_DIR`` (a checkout of GitHub
``pjjajal/adaperceiver-public``; it needs ``einops`` and ``huggingface_hub`` besides torch and timm). The public
code is only run here, never imported by the package or its tests.

It builds the official ``ClassificationAdaPerceiver`` (and the distilled ``DistillAdaPerceiver``) with a tiny
config and seeded random weights, every parameter drawn at a scale that matters (LayerScale, norms and latent
tokens too: at their init values a wrong RoPE layout or norm would barely move the logits; the latent and output
tokens stay small, as trained ones start, so the LayerNorm eps matters), saves each with its
own ``save_pretrained`` (the release's ``config.json`` + ``model.safetensors`` layout) and records the official
logits on fixed random images at every (tokens, width, depth) and with per-sample widths in ``expected.safetensors``:

* ``images`` (B, C, H, W) uint8: the test images are ``images / 255`` in [0, 1], what this package's model takes (it
  normalises inside; the official model is fed ``(images / 255 - CLIP mean) / CLIP std``);
* ``logits`` (K, M, L, B, classes): tokens ``mask_token_grans[k]``, width ``mat_dims[m]``, depth ``l + 1``;
* ``per_sample_widths`` (B,) and ``logits_per_sample`` (K, L, B, classes) at those widths.

Variants, one folder each under OUT_DIR: ``classifier`` (flex attention, block mask: the release's class as
trained), ``attn_full`` (``attn_layer: full``, which drops the mask) and ``distill`` (the distilled class, whose
feature branch the loader ignores). Each official model is rebuilt for every call, because its block-mask cache
returns a mask built for other granularities (DESIGN §2).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 0
IMAGES = 4
CONFIG = {
    "embed_dim": 16,
    "num_heads": 2,
    "depth": 3,
    "max_latent_tokens": 8,
    "rope_theta": 10000,
    "ffn_ratio": 2.57,  # non-integer like the release: hidden int(w * 2.57) = 10 / 20 / 41
    "qkv_bias": True,
    "proj_bias": True,
    "ls_init_values": 1e-6,
    "act_layer": "gelu",
    "norm_layer": "layernorm",
    "ffn_layer": "mlp",
    "attn_layer": "flex",
    "block_mask": "block",
    "mask_token_grans": [2, 4, 8],
    "mat_dims": [4, 8, 16],
    "img_size": 32,
    "in_channels": 3,
    "patch_size": 8,
    "num_classes": 5,
    "use_embed_ffn": True,
    "use_output_ffn": False,
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter to a seeded random value of a scale where each one changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".gamma"):  # LayerScale
                p.copy_(0.5 + 0.25 * noise)
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "token" in name:  # near its 1e-6 init: the sink norms of read and write then depend on eps
                p.copy_(0.003 * noise)
            elif name.endswith(".bias") or "pos_embed" in name:
                p.copy_(0.2 * noise)
            else:  # weights of linears and the patch convolution: unit-variance outputs
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(noise / fan_in**0.5)


def official_logits(build, state: dict, x: torch.Tensor, **kwargs) -> torch.Tensor:
    model = build()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(x, **kwargs).logits.reshape(x.shape[0], -1)


def make_variant(out: Path, cls, config: dict, state: dict, images: torch.Tensor, mean, std) -> None:
    def build():
        return cls(**config)

    x = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    grans, widths, depth = config["mask_token_grans"], config["mat_dims"], config["depth"]

    def depths(g: int, width: int | list[int]) -> torch.Tensor:
        return torch.stack(
            [official_logits(build, state, x, num_tokens=g, mat_dim=width, depth=d) for d in range(1, depth + 1)]
        )

    logits = torch.stack([torch.stack([depths(g, w) for w in widths]) for g in grans])
    per_sample = [widths[i % len(widths)] for i in range(images.shape[0])][::-1]
    logits_per_sample = torch.stack([depths(g, per_sample) for g in grans])
    model = build()
    model.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for extra in sorted(set(os.listdir(out)) - {"config.json", "model.safetensors"}):
        (out / extra).unlink()  # the mixin's model card: not part of what the loader reads
    tensors = {
        "images": (images * 255).round().to(torch.uint8),
        "logits": logits,
        "per_sample_widths": torch.tensor(per_sample),
        "logits_per_sample": logits_per_sample,
    }
    meta = {"generated_by": "scripts/make_official_fixture.py", "seed": str(SEED), "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "expected.safetensors", metadata=meta)
    print(f"{out}: logits {tuple(logits.shape)}, |logits| max {logits.abs().max():.2f}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    public, out = Path(argv[0]).resolve(), Path(argv[1])
    torch.set_num_threads(1)
    sys.path.insert(0, str(public))
    from hub.networks.adaperceiver_classification import ClassificationAdaPerceiver
    from hub.networks.adaperceiver_distill import DistillAdaPerceiver
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.manual_seed(SEED)
    model = ClassificationAdaPerceiver(**CONFIG)
    randomise(model, SEED)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(SEED + 1)
    shape = (IMAGES, CONFIG["in_channels"], CONFIG["img_size"], CONFIG["img_size"])
    images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).float() / 255
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    make_variant(out / "classifier", ClassificationAdaPerceiver, CONFIG, state, images, mean, std)
    full = {**CONFIG, "attn_layer": "full"}
    make_variant(out / "attn_full", ClassificationAdaPerceiver, full, state, images, mean, std)
    distill_cfg = {**CONFIG, "output_feat_dim": 12}
    distill = DistillAdaPerceiver(**distill_cfg)
    randomise(distill, SEED + 2)  # feature branch random; the shared part gets the classifier's weights below
    distill_state = {**distill.state_dict(), **state}
    make_variant(out / "distill", DistillAdaPerceiver, distill_cfg, distill_state, images, mean, std)
    (out / "README.md").write_text(
        "Generated by `python scripts/make_official_fixture.py PATH_TO_ADAPERCEIVER_PUBLIC "
        "tests/fixtures/official_tiny`\nfrom GitHub pjjajal/adaperceiver-public (MIT, commit cfd5aca) with random "
        "weights; data only, no code of that repository.\n"
    )
    print(json.dumps({"config": CONFIG}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
