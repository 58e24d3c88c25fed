"""Backbone checkpoints: safetensors weights with the config in the file's metadata, written atomically.

The sha256 of the file is the backbone's identity: outcome tables and controllers record it and refuse to be
used with any other backbone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import save_file

from backbone.config import AdaPerceiverConfig
from backbone.fileio import atomic_write, file_sha256, packaged_file
from backbone.model import AdaPerceiver

FORMAT = "adaperceiver-rl/backbone"
FORMAT_VERSION = "1"
METADATA_KEY = "adaperceiver"
DEFAULT_BACKBONE = packaged_file("checkpoints", "adaperceiver_fmnist_stages.safetensors")  # shipped as package data


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, foreign or does not fit the model."""


def save_backbone(model: AdaPerceiver, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> str:
    """Write weights + config (+ free-form ``metadata``, JSON-encoded) atomically; return the file's sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes several keys in arbitrary order, and the file's sha256 must only
    # depend on weights + config + metadata (retraining with the same seed then reproduces the same identity)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.cfg.to_dict(), "info": metadata or {}}
    meta = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return file_sha256(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Our header (format, config, info); CheckpointError if the file is missing, truncated or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone checkpoint not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        header = json.loads(meta[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        header = {}
    if not isinstance(header, dict) or header.get("format") != FORMAT or "config" not in header:
        raise CheckpointError(f"{path} is not an AdaPerceiver backbone checkpoint (no '{FORMAT}' metadata)")
    return header


def load_backbone(path: str | os.PathLike = DEFAULT_BACKBONE, device: str | torch.device = "cpu") -> AdaPerceiver:
    """Rebuild the model from the file's config, load its weights, freeze it in eval mode.

    The returned model carries ``checkpoint_path``, ``checkpoint_sha256`` and ``checkpoint_info`` attributes.
    """
    meta = read_metadata(path)
    try:
        cfg = AdaPerceiverConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} holds an invalid model config: {e}") from None
    model = AdaPerceiver(cfg)
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read the weights of {path} (truncated or corrupt?): {e}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {reshaped[:5]}"
        )
    model.load_state_dict(state)
    model.requires_grad_(False).eval().to(device)
    model.checkpoint_path = str(Path(path).resolve())
    model.checkpoint_sha256 = file_sha256(path)
    model.checkpoint_info = meta.get("info", {})
    return model
