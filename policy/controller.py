"""The trained controller: a stable-baselines3 PPO policy used as a deterministic setting chooser.

At inference only the actor path runs (features -> policy MLP -> action logits -> argmax per action dimension),
so that is what :func:`actor_flops` counts; the value network is training-only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from backbone.checkpoint import atomic_write


def actor_flops(policy: ActorCriticPolicy) -> int:
    """FLOPs per decision of the actor path (2 per multiply-add of each Linear; activations not counted)."""
    modules = [policy.pi_features_extractor, policy.mlp_extractor.policy_net, policy.action_net]
    return sum(
        2 * m.in_features * m.out_features for part in modules for m in part.modules() if isinstance(m, nn.Linear)
    )


@torch.no_grad()
def choose_actions(policy: ActorCriticPolicy, obs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Deterministic actions ``(B, 3)`` (token, depth, width indices) for a batch of observations.

    The mode of the MultiDiscrete distribution is the argmax of each action dimension's logits; computing it
    from the logits skips building ``torch.distributions`` objects, whose argument checks cost more than the
    tiny actor network at batch 1. ``tests/test_policy.py`` checks it against ``get_distribution(obs).mode()``.
    """
    obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=policy.device)
    if obs_t.ndim == 1:
        obs_t = obs_t[None]
    policy.set_training_mode(False)
    if not isinstance(policy.action_space, spaces.MultiDiscrete):
        return policy.get_distribution(obs_t).mode().cpu().numpy().reshape(len(obs_t), -1).astype(np.int64)
    features = policy.extract_features(obs_t, policy.pi_features_extractor)
    logits = policy.action_net(policy.mlp_extractor.forward_actor(features))
    parts = torch.split(logits, [int(n) for n in policy.action_space.nvec], dim=1)
    return torch.stack([p.argmax(dim=1) for p in parts], dim=1).cpu().numpy().astype(np.int64)


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
