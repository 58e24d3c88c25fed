"""Small convolutional stem, with optional early exits: an input-side compute axis for tiny images.

DESIGN §2 allows a conv stem in place of the patch convolution if it measures better (the public code offers
a ConvNeXt stem). Ours: one 3x3 convolution + GELU per entry of ``stem_dims`` (strides from ``stem_strides``,
by default 2 for the first and 1 for the rest), then a convolution with kernel = stride = the downsampling still
missing to the patch grid, to the patch-token width (``patch_dim``, or ``embed_dim``): the same patch grid as
``timm.layers.PatchEmbed``.

On Fashion-MNIST the accuracy is bought by the depth of this stem (issue 18), so it can also *exit early*: after
the first ``e`` convolutions (``stem_exits``) a light projection (average pooling to the patch grid, then a 1x1
convolution) turns the feature map into the same patch tokens; an exit after 0 convolutions is ViT's linear
patch embedding of the image (kernel = stride = patch). A deeper stage continues from a shallower one's feature
map (the image itself for stage 0), so running the shallowest stage first (the controller's probe) and then the
deepest redoes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class ConvStem(nn.Module):
    """Image ``(B, C, H, W)`` -> patch tokens ``(B, (H/p)*(W/p), out_dim)``, after all convs or an early exit."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        out_dim: int,
        stem_dims: Sequence[int],
        strides: Sequence[int],
        exits: Sequence[int] = (),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip((in_chans, *stem_dims[:-1]), stem_dims, strides, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        rest = patch_size // math.prod(strides)  # downsampling left for the projection
        self.proj = nn.Conv2d(stem_dims[-1], out_dim, kernel_size=rest, stride=rest)
        self.num_patches = (img_size // patch_size) ** 2
        self.exit_convs = tuple(exits)
        grid = img_size // patch_size
        self.exits = nn.ModuleList()
        for e in exits:
            if e == 0:  # no convolution yet: ViT's linear patch embedding of the image, the cheapest adapter
                self.exits.append(nn.Conv2d(in_chans, out_dim, kernel_size=patch_size, stride=patch_size))
                continue
            side = img_size
            for stride in strides[:e]:
                side = -(-side // stride)
            self.exits.append(nn.Sequential(nn.AvgPool2d(side // grid), nn.Conv2d(stem_dims[e - 1], out_dim, 1)))
        self.stages = (*self.exit_convs, len(stem_dims))  # convs run at each stage, shallowest first
        # channels-last weights put oneDNN on its NHWC kernels, which run these small convolutions (one input
        # channel first) faster: adaptive predict gains 6-10% at batch 256 (python -m benchmarks.stem_layout);
        # checkpoints store the weights contiguous as always
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after every convolution (the deepest stage)."""
        return self.tokens(self.features(x, 0, self.stages[-1]), self.stages[-1])

    def features(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Convolutions ``start..stop-1`` (0-based) on an image (``start=0``) or an earlier feature map."""
        # Convolutions stay fp32 on CPU even under bf16 autocast: without native bf16 (AVX2-only CPUs) oneDNN's
        # bf16 convolutions are 4-7x slower than fp32 (measured: 0.28 s vs 0.06 s fwd+bwd for 256 images with
        # the default stem), and the stem is a small share of the FLOPs anyway.
        with torch.autocast("cpu", enabled=False):
            x = x.to(self.proj.weight.dtype)  # autocast may hand us bf16; the weights decide
            return self.convs[2 * start : 2 * stop](x)

    def tokens(self, features: torch.Tensor, stage: int) -> torch.Tensor:
        """Patch tokens from the feature map after ``stage`` convolutions (an exit, or the full projection)."""
        proj = self.proj if stage == self.stages[-1] else self.exits[self.exit_convs.index(stage)]
        with torch.autocast("cpu", enabled=False):
            return proj(features.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
