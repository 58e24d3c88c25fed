"""Gymnasium environment for choosing an AdaPerceiver's compute setting per image, its outcome tables and specs.

Importing this package registers ``AdaPerceiverCompute-v0``::

    import gymnasium as gym
    import envs

    env = gym.make("AdaPerceiverCompute-v0", flops_penalty=0.3)
"""

import gymnasium

from envs.compute_env import MODES, REWARDS, AdaPerceiverComputeEnv, resolve_backbone
from envs.observations import DEFAULT_OBSERVATION, OBSERVATIONS, ObservationSpec, get_observation, probe_setting
from envs.outcome_table import (
    OutcomeTable,
    backbone_identity,
    dataset_sha256,
    default_cache_dir,
    load_or_build,
    table_path,
)
from envs.vec import make_vec_env

ENV_ID = "AdaPerceiverCompute-v0"

if ENV_ID not in gymnasium.registry:  # importing twice (or reloading) must not re-register
    gymnasium.register(id=ENV_ID, entry_point="envs.compute_env:AdaPerceiverComputeEnv")

__all__ = [
    "DEFAULT_OBSERVATION",
    "ENV_ID",
    "MODES",
    "OBSERVATIONS",
    "REWARDS",
    "AdaPerceiverComputeEnv",
    "ObservationSpec",
    "OutcomeTable",
    "backbone_identity",
    "dataset_sha256",
    "default_cache_dir",
    "get_observation",
    "load_or_build",
    "make_vec_env",
    "probe_setting",
    "resolve_backbone",
    "table_path",
]
