"""One entry point from a run folder to the classifier that runs it (one-shot, sequential or cascade, as its sidecar
says)."""

from __future__ import annotations

import os

from policy.adaptive import AdaptiveClassifier
from policy.sequential_inference import SequentialClassifier
from policy.sidecar import resolve_run


def load_classifier(
    run: str | os.PathLike, backbone: str | os.PathLike | None = None, device: str = "cpu"
) -> AdaptiveClassifier | SequentialClassifier:
    """The compute-saving classifier of a run folder (``policy.json`` names its controller kind)."""
    _, sidecar = resolve_run(run)
    kind = sidecar.get("controller", "oneshot")
    if kind == "sequential":
        return SequentialClassifier.load(run, backbone=backbone, device=device)
    if kind not in ("oneshot", "cascade"):
        raise ValueError(f"{run}: unknown controller kind {kind!r} in its policy.json (oneshot, sequential or cascade)")
    return AdaptiveClassifier.load(run, backbone=backbone, device=device)
