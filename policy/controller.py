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
import torch.nn.functional as F
from stable_baselines3 import PPO
from stable_baselines3.common.distributions import MultiCategoricalDistribution
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


def action_logits(policy: ActorCriticPolicy, obs: torch.Tensor) -> torch.Tensor:
    """The actor's logits ``(B, sum(nvec))`` for a batch of observations: features, actor MLP, action head."""
    return policy.action_net(
        policy.mlp_extractor.forward_actor(policy.extract_features(obs, policy.pi_features_extractor))
    )


def choose_actions(policy: ActorCriticPolicy, obs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Deterministic actions ``(B, 3)`` (token, depth, width indices) for a batch of observations.

    The mode of SB3's MultiDiscrete distribution (the argmax of each action dimension's probabilities), computed
    with the same ops as ``get_distribution(obs).mode()`` (``tests/test_policy.py`` pins the two together) but
    without ``policy.predict``'s per-call work (observation checks, building one ``Categorical`` per dimension,
    ``set_training_mode`` over every submodule): at batch 1 that work cost more than the controller's matmuls.
    """
    obs = torch.as_tensor(obs, dtype=torch.float32, device=policy.device)
    obs = obs.reshape(-1, obs.shape[-1])
    if not isinstance(policy.action_dist, MultiCategoricalDistribution):
        actions, _ = policy.predict(obs.cpu().numpy(), deterministic=True)
        return np.asarray(actions, dtype=np.int64).reshape(len(actions), -1)
    if policy.training:
        policy.set_training_mode(False)  # what predict does, once instead of on every call
    with torch.no_grad():
        logits = action_logits(policy, obs).split(list(policy.action_dist.action_dims), dim=1)
        # Categorical(logits=l) normalises by logsumexp and its mode is the argmax of softmax of that
        picks = [F.softmax(x - x.logsumexp(-1, keepdim=True), -1).argmax(1) for x in logits]
    return torch.stack(picks, 1).cpu().numpy()


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
