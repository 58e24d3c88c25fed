"""Gymnasium environments for choosing an AdaPerceiver's compute setting per image, its outcome tables and specs.

Importing this package registers ``AdaPerceiverCompute-v0`` (one-shot) and ``AdaPerceiverSequential-v0``::

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
from envs.sequential_env import AdaPerceiverSequentialEnv
from envs.sequential_steps import SequentialSteps
from envs.vec import EPISODES, make_vec_env

ENV_ID = "AdaPerceiverCompute-v0"
SEQUENTIAL_ENV_ID = "AdaPerceiverSequential-v0"

for _id, _entry in (
    (ENV_ID, "compute_env:AdaPerceiverComputeEnv"),
    (SEQUENTIAL_ENV_ID, "sequential_env:AdaPerceiverSequentialEnv"),
):
    if _id not in gymnasium.registry:  # importing twice (or reloading) must not re-register
        gymnasium.register(id=_id, entry_point=f"envs.{_entry}")

__all__ = [
    "DEFAULT_OBSERVATION",
    "ENV_ID",
    "EPISODES",
    "MODES",
    "OBSERVATIONS",
    "REWARDS",
    "SEQUENTIAL_ENV_ID",
    "AdaPerceiverComputeEnv",
    "AdaPerceiverSequentialEnv",
    "ObservationSpec",
    "OutcomeTable",
    "SequentialSteps",
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
