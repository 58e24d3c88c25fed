"""Start a training run from a backbone checkpoint (fine-tuning) instead of a fresh initialisation.

The checkpoint gives the architecture and every weight (``python -m backbone.train init=PATH``): the shipped
backbone trained on, or the released ImageNet model (``backbone.convert_official``) adapted to an image folder.
Only the label set may change: with another ``num_classes`` the classifier head is new (timm's convention when
pretrained weights meet a new task) and every other weight is kept. Any other architecture change would leave
weights that no longer fit, so it is refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from backbone.checkpoint import load_backbone
from backbone.model import AdaPerceiver

HEAD_PREFIX = "head."  # the only weights that depend on the label set
ADAPTABLE = ("num_classes",)  # model_overrides a fine-tuning run may set


def init_from_checkpoint(path: str | os.PathLike, model_overrides: dict[str, Any] | None = None) -> AdaPerceiver:
    """A trainable model holding ``path``'s weights; ``model_overrides`` may only set ``num_classes`` (a new head,
    initialised from the current torch seed as a fresh model's is)."""
    overrides = dict(model_overrides or {})
    refused = sorted(set(overrides) - set(ADAPTABLE))
    if refused:
        raise ValueError(
            f"init={path}: the architecture is the checkpoint's; model_overrides may only set "
            f"{', '.join(ADAPTABLE)} when fine-tuning, got {refused}"
        )
    pretrained = load_backbone(path)
    num_classes = overrides.get("num_classes", pretrained.cfg.num_classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"init={path}: model_overrides.num_classes must be a positive integer, got {num_classes!r}")
    cfg = dataclasses.replace(pretrained.cfg, num_classes=num_classes)
    model = AdaPerceiver(cfg)  # freshly initialised; every weight but a new head is overwritten below
    new_head = cfg.num_classes != pretrained.cfg.num_classes
    kept = {k: v for k, v in pretrained.state_dict().items() if not (new_head and k.startswith(HEAD_PREFIX))}
    model.load_state_dict(kept, strict=not new_head)  # the same architecture: only a new head's keys are missing
    model.init_checkpoint_sha256 = pretrained.checkpoint_sha256
    return model.requires_grad_(True).train()
