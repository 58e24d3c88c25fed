"""Named model sizes, ``create_model`` and registration with timm's model registry.

Each named size is a tiny function holding only its size dict (timm's ``@register_model`` pattern), so
``timm.create_model("adaperceiver_test")`` works as well as ``backbone.create_model("adaperceiver_test")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import register_model

from backbone.config import AdaPerceiverConfig
from backbone.model import AdaPerceiver

_ENTRYPOINTS: dict[str, Callable[..., AdaPerceiver]] = {}
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _build(name: str, size: dict[str, Any], pretrained: bool = False, **overrides: Any) -> AdaPerceiver:
    for key in _TIMM_ONLY_KWARGS:  # passed by timm.create_model, meaningless here
        overrides.pop(key, None)
    if pretrained:
        raise ValueError("no weights are downloaded; load a checkpoint with backbone.load_backbone(path)")
    return AdaPerceiver(AdaPerceiverConfig.from_dict({"name": name, **size, **overrides}))


def _named_size(fn: Callable[..., AdaPerceiver]) -> Callable[..., AdaPerceiver]:
    _ENTRYPOINTS[fn.__name__] = fn
    return register_model(fn)


TEST_SIZE = dict(
    patch_size=7,
    stem="patch",
    embed_dim=32,
    num_heads=2,
    depth=3,
    ffn_ratio=2.0,
    token_granularities=(2, 4, 8),
    widths=(8, 16, 32),
)


@_named_size
def adaperceiver_test(pretrained: bool = False, **kwargs: Any) -> AdaPerceiver:
    """Tiny size for tests: 28x28x1 input, 16 patches, D=32, 3 blocks, 3 x 3 x 3 settings."""
    return _build("adaperceiver_test", TEST_SIZE, pretrained, **kwargs)


@_named_size
def adaperceiver_test_stages(pretrained: bool = False, **kwargs: Any) -> AdaPerceiver:
    """Tiny size with the input-side axis for tests: ``adaperceiver_test``'s latent part behind a 3-conv stem
    (8, 16, 16 channels) with exits after 0 (linear patch embedding), 1 and 2 convs, 7x7 patches: 4 x 3 x 3 x 3
    settings."""
    stem = dict(patch_size=4, stem="conv", stem_dims=(8, 16, 16), stem_strides=(1, 2, 2), stem_exits=(0, 1, 2))
    size = {**TEST_SIZE, **stem, "patch_dim": 16}
    return _build("adaperceiver_test_stages", size, pretrained, **kwargs)


FMNIST_SIZE = dict(
    patch_size=4,
    stem="conv",
    stem_dims=(16, 32, 64),
    stem_strides=(1, 2, 2),
    patch_dim=64,
    patch_context_kernel=3,
    embed_dim=128,
    num_heads=8,
    depth=8,
    ffn_ratio=4.0,
    token_granularities=(4, 8, 16, 32),
    widths=(32, 64, 128),
)


@_named_size
def adaperceiver_fmnist(pretrained: bool = False, **kwargs: Any) -> AdaPerceiver:
    """Default for 28x28x1, 10 classes: 3-conv stem to 64-wide 7x7 patch tokens, D=128, 8 blocks, 4 x 8 x 3 settings.

    The stem (3x3 convs to 16 channels at 28x28, 32 at 14x14, 64 at 7x7, then 1x1) with a depthwise 3x3 patch
    context and 64-wide patch tokens (half the read's key/value FLOPs) gave 90.11% vs 89.16% for the earlier
    one-conv stem at the same compute (docs/results/README.md).
    """
    size = FMNIST_SIZE
    return _build("adaperceiver_fmnist", size, pretrained, **kwargs)


@_named_size
def adaperceiver_fmnist_stages(pretrained: bool = False, **kwargs: Any) -> AdaPerceiver:
    """``adaperceiver_fmnist`` plus the input-side axis of issue 18: the stem can exit before any convolution (a
    linear patch embedding) or after its first or second one (average pooling to the 7x7 grid + 1x1 conv to the
    tokens), and the grid reaches down to 2 latents and FFN width 16: 4 x 5 x 8 x 4 = 640 settings from 1.1 to
    115.8 MFLOPs (docs/results, adapter-stage pilots and runs)."""
    grid = {"token_granularities": (2, 4, 8, 16, 32), "widths": (16, 32, 64, 128)}
    size = {**FMNIST_SIZE, "stem_exits": (0, 1, 2), **grid}
    return _build("adaperceiver_fmnist_stages", size, pretrained, **kwargs)


@_named_size
def adaperceiver_in1k(pretrained: bool = False, **kwargs: Any) -> AdaPerceiver:
    """Shape of the released ImageNet-1K model (DESIGN §2, issue 19), built, not trained here: CLIP mean/std after
    Resize(256) + CenterCrop(224), the LayerNorm + MLP input adapter, eps 1e-6, no norm before the head, float32
    RoPE tables. The public configs disagree on the patch size (16 supervised, 14 distilled): this size says 16;
    ``backbone.load_official`` takes it, and everything else, from the release's ``config.json``."""
    size = dict(
        img_size=224,
        in_chans=3,
        num_classes=1000,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        resize_size=256,
        patch_size=16,
        stem="patch",
        embed_mlp=True,
        embed_dim=832,
        num_heads=13,
        depth=21,
        ffn_ratio=2.57,
        rope_theta=10000.0,
        rope_fp32=True,
        norm_eps=1e-6,
        head_norm=False,
        ls_init_values=1e-6,
        token_granularities=(32, 64, 96, 128, 192, 256),
        widths=(416, 624, 832),
    )
    return _build("adaperceiver_in1k", size, pretrained, **kwargs)


MODEL_NAMES = tuple(_ENTRYPOINTS)


def create_model(name: str, **overrides: Any) -> AdaPerceiver:
    """Build a named size; ``overrides`` replace fields of its :class:`AdaPerceiverConfig`."""
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    return _ENTRYPOINTS[name](**overrides)
