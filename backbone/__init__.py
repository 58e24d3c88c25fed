"""AdaPerceiver backbone: model, named sizes, FLOPs, checkpoints (training and data live in submodules)."""

from backbone.checkpoint import DEFAULT_BACKBONE, CheckpointError, file_sha256, load_backbone, save_backbone
from backbone.config import AdaPerceiverConfig
from backbone.factory import MODEL_NAMES, create_model
from backbone.flops import flops_breakdown, measure_flops
from backbone.model import AdaPerceiver, PatchMemory
from backbone.official import load_official

__all__ = [
    "DEFAULT_BACKBONE",
    "MODEL_NAMES",
    "AdaPerceiver",
    "AdaPerceiverConfig",
    "CheckpointError",
    "PatchMemory",
    "create_model",
    "file_sha256",
    "flops_breakdown",
    "load_backbone",
    "load_official",
    "measure_flops",
    "save_backbone",
]
