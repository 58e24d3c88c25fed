"""The probe cascade as a deployable controller: two numbers instead of a PPO policy.

Answer with the probe (the grid's cheapest setting, which every controller runs anyway) when its top-1 probability
is at least ``tau``, else run one setting X, going on from the probe's work. ``(tau, X)`` is fitted on policy-train
by the controllers' own reward, ``accuracy - penalty * FLOPs / FLOPs(full)`` (an exhaustive search: seconds, no
PPO). On the default backbone it is as accurate as the PPO controller at equal FLOPs (``docs/results/ablation.md``)
and faster in wall-clock: every unsure image goes to one setting, so the blocks run as one group instead of one
per distinct setting the PPO controller picks (``python train_policy.py --controller cascade``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone.fileio import read_json, write_json
from envs import get_observation
from envs.observations import PROBE_STATS, probe_setting
from policy.baselines import probe_cascade

OBSERVATION = "probe"  # the cascade looks at the probe's statistics only (and uses the top-1 probability)
# thresholds searched: every 0.01 from 0.5, finer near 1; 1.01 means never stop at the probe
CASCADE_TAUS = tuple(np.unique(np.round(np.r_[np.linspace(0.5, 1.0, 51), 0.995, 0.999, 1.01], 4)).tolist())


@dataclass(frozen=True)
class ProbeCascade:
    """``tau`` and the grid indices of the fallback setting X and of the probe.

    Its decision is one comparison per image, counted as 0 FLOPs like the PPO actor's argmax; the probe and its
    statistics are the observation's FLOPs (``get_observation("probe").flops``).
    """

    tau: float
    setting: tuple[int, ...]
    probe: tuple[int, ...]

    def __call__(self, obs: torch.Tensor | np.ndarray) -> np.ndarray:
        """Setting indices ``(B, grid.ndim)`` from the "probe" observation ``(B, 3)`` (top-1 probability first)."""
        return self.choose(np.asarray(torch.as_tensor(obs, dtype=torch.float32).reshape(-1, len(PROBE_STATS))[:, 0]))

    def choose(self, top1: np.ndarray) -> np.ndarray:
        """Setting indices ``(B, grid.ndim)`` from the probe's top-1 probabilities ``(B,)``."""
        return np.where((np.asarray(top1) >= self.tau)[:, None], np.array([self.probe]), np.array([self.setting]))

    def table_actions(self, table) -> np.ndarray:
        """The settings it runs each sample of an outcome table at (the table keeps every setting's top-1
        probability, computed by the function that computes it live: ``backbone.prediction_stats``)."""
        return self.choose(table.confidence[(slice(None), *self.probe)])

    def to_json(self) -> dict[str, Any]:
        return {"tau": self.tau, "setting": list(self.setting), "probe": list(self.probe)}

    @classmethod
    def from_json(cls, data: dict[str, Any], grid_shape: tuple[int, ...]) -> ProbeCascade:
        """Refuse indices outside ``grid_shape`` (a file edited by hand, or of another grid)."""
        try:
            cascade = cls(
                float(data["tau"]), tuple(int(i) for i in data["setting"]), tuple(int(i) for i in data["probe"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a probe cascade (need tau, setting, probe): {e}") from None
        for name, index in (("setting", cascade.setting), ("probe", cascade.probe)):
            if len(index) != len(grid_shape) or not all(0 <= i < n for i, n in zip(index, grid_shape, strict=True)):
                raise ValueError(
                    f"cascade {name} {list(index)} is not an index of the settings grid {list(grid_shape)}"
                )
        return cascade


def all_cascades(model, table) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Accuracy and mean FLOPs on ``table`` of every ``(tau, X)``, shape ``(len(CASCADE_TAUS), *grid.shape)``, and
    the probe's index. Priced like a controller: every image pays the "probe" observation; an image the probe answers
    also pays what the probe does beyond the reused part, and one sent on pays X's FLOPs beyond it."""
    spec = get_observation(OBSERVATION)
    grid, reused, overhead = table.grid, spec.reused_flops(model), spec.flops(model)
    probe = tuple(int(i) for i in grid.index(probe_setting(model)))
    acc, cost = probe_cascade(table.correct, table.confidence, grid.flops, reused, overhead, CASCADE_TAUS, probe)
    return acc, cost, probe


def _cascade_at(best: tuple, acc: np.ndarray, cost: np.ndarray, probe) -> tuple[ProbeCascade, float, float]:
    cascade = ProbeCascade(CASCADE_TAUS[best[0]], tuple(int(i) for i in best[1:]), probe)
    return cascade, float(acc[best]), float(cost[best])


def fit_cascade(model, table, penalty: float) -> tuple[ProbeCascade, float, float]:
    """The ``(tau, X)`` of highest mean reward on ``table`` (policy-train), with its accuracy and mean FLOPs there."""
    acc, cost, probe = all_cascades(model, table)
    best = np.unravel_index(int((acc - penalty * cost / table.grid.full_flops).argmax()), acc.shape)
    return _cascade_at(best, acc, cost, probe)


def fit_cascade_to_accuracy(model, table, drop: float) -> tuple[ProbeCascade, float, float]:
    """The cheapest ``(tau, X)`` on ``table`` (policy-train) whose accuracy there is at least the full setting's
    minus ``drop`` (a fraction: 0.0005 = 0.05 points), with its accuracy and mean FLOPs there: the cascade aimed at
    the iso-accuracy point instead of a penalty. ``tau`` = 1.01 with X = the full setting always qualifies."""
    if not 0 <= drop < 1:
        raise ValueError(f"the accuracy drop is a fraction in [0, 1), got {drop}")
    acc, cost, probe = all_cascades(model, table)
    target = table.correct[(slice(None), *table.grid.full_index)].mean() - drop
    allowed = np.where(acc >= target - 1e-12, cost, np.inf)  # 1e-12: the full setting's own accuracy, summed apart
    best = np.unravel_index(int(allowed.argmin()), allowed.shape)
    return _cascade_at(best, acc, cost, probe)


def save_cascade(cascade: ProbeCascade, path: str | os.PathLike) -> None:
    write_json(path, cascade.to_json())  # atomic: temp file, then rename


def load_cascade(path: str | os.PathLike, grid_shape: tuple[int, ...]) -> ProbeCascade:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cascade file not found: {path}")
    try:
        return ProbeCascade.from_json(read_json(path), grid_shape)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
