"""The trained controller: a stable-baselines3 PPO policy used as a deterministic setting chooser.

At inference only the actor path runs (features -> policy MLP -> action logits -> argmax per action dimension),
so that is what :func:`actor_flops` counts; the value network is training-only.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from backbone.fileio import atomic_write


def actor_flops(policy: ActorCriticPolicy) -> int:
    """FLOPs per decision of the actor path (2 per multiply-add of each Linear; activations not counted)."""
    modules = [policy.pi_features_extractor, policy.mlp_extractor.policy_net, policy.action_net]
    return sum(
        2 * m.in_features * m.out_features for part in modules for m in part.modules() if isinstance(m, nn.Linear)
    )


def mlp_actor_flops(obs_dim: int, net_arch: list[int], logits: int) -> int:
    """:func:`actor_flops` of an SB3 ``MlpPolicy`` with hidden sizes ``net_arch`` before it is built (an
    environment that charges each decision needs the figure first)."""
    sizes = [obs_dim, *net_arch, logits]
    return sum(2 * a * b for a, b in itertools.pairwise(sizes))


def choose_actions(policy: ActorCriticPolicy, obs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Deterministic actions ``(B, 3)`` (token, depth, width indices) for a batch of observations.

    Through SB3's public API (``predict(..., deterministic=True)``: the mode of the MultiDiscrete distribution,
    i.e. the argmax of each action dimension's logits); ``tests/test_policy.py`` pins it to
    ``get_distribution(obs).mode()``.
    """
    obs = np.asarray(obs.cpu() if isinstance(obs, torch.Tensor) else obs, dtype=np.float32)
    actions, _ = policy.predict(obs.reshape(-1, obs.shape[-1]), deterministic=True)
    return np.asarray(actions, dtype=np.int64).reshape(len(actions), -1)


def save_ppo_atomic(model: PPO, path: str | os.PathLike) -> None:
    """``model.save`` into a temp file, then rename (a crash never leaves a half-written ``policy.zip``)."""

    def write(tmp: str) -> None:
        buffer = io.BytesIO()
        model.save(buffer)
        Path(tmp).write_bytes(buffer.getvalue())

    atomic_write(path, write)


def load_ppo(path: str | os.PathLike, env=None, device: str = "cpu") -> PPO:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"controller file not found: {path}")
    try:
        return PPO.load(path, env=env, device=device)
    except Exception as e:  # zip/pickle errors of a foreign or truncated file
        raise ValueError(f"{path} is not a readable stable-baselines3 PPO file: {e}") from None
