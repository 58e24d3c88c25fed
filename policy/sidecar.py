"""``policy.json``: what a controller was trained for, so it is never used with anything else.

The controller's actions index a settings grid, and its observations come from one backbone; loading it with a
backbone of another sha256, or another grid or observation spec, would silently choose wrong settings.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from backbone.fileio import read_json, write_json
from backbone.settings import SettingsGrid

SIDECAR = "policy.json"
POLICY_ZIP = "policy.zip"  # a PPO controller (one-shot or sequential)
CASCADE_JSON = "cascade.json"  # a probe cascade (policy.cascade)
CONTROLLER_FILES = (POLICY_ZIP, CASCADE_JSON)


def versions() -> dict[str, str]:
    import gymnasium
    import stable_baselines3
    import timm
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "gymnasium": gymnasium.__version__,
    }


def write_sidecar(path: str | os.PathLike, data: dict[str, Any]) -> None:
    write_json(path, dict(sorted(data.items())))


def resolve_run(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Run folder or one of its files -> (path of the controller file, sidecar dict).

    The controller file is ``policy.zip`` (PPO) or ``cascade.json`` (a probe cascade), as the sidecar's
    ``controller`` says.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such run folder or file: {path} (train_policy.py writes run folders)")
    run_dir = path if path.is_dir() else path.parent
    sidecar = run_dir / SIDECAR
    if not sidecar.is_file():
        raise FileNotFoundError(f"no {SIDECAR} in {run_dir} (expected a run folder written by train_policy.py)")
    data = read_json(sidecar)
    controller = run_dir / (CASCADE_JSON if data.get("controller") == "cascade" else POLICY_ZIP)
    if not controller.is_file():
        raise FileNotFoundError(f"no {controller.name} in {run_dir} (expected a run folder written by train_policy.py)")
    return controller, data


def check_compatible(sidecar: dict[str, Any], backbone_sha256: str, grid: SettingsGrid, observation: str) -> None:
    """Raise ValueError with a one-line reason if the controller does not belong to this backbone/grid/spec."""
    if sidecar.get("backbone_sha256") != backbone_sha256:
        trained_on = sidecar.get("backbone_path") or "the shipped checkpoint"  # None in policy.json = shipped
        raise ValueError(
            f"controller was trained for backbone sha256 {str(sidecar.get('backbone_sha256'))[:12]}... "
            f"({trained_on}), not {backbone_sha256[:12]}...; use the backbone it was trained with"
        )
    if not grid.matches(sidecar.get("grid") or {}):
        raise ValueError(f"controller settings grid {sidecar.get('grid')} differs from the backbone's {grid.to_json()}")
    if sidecar.get("observation") != observation:
        raise ValueError(f"controller observation spec {sidecar.get('observation')!r} differs from {observation!r}")
