"""Vectorised copies of the compute environment that share one outcome table (stable-baselines3 ``VecEnv``)."""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from envs.compute_env import MODES, AdaPerceiverComputeEnv, resolve_backbone
from envs.sequential_env import AdaPerceiverSequentialEnv

VEC_ENVS = {"dummy": DummyVecEnv, "subproc": SubprocVecEnv}
EPISODES = {"oneshot": AdaPerceiverComputeEnv, "sequential": AdaPerceiverSequentialEnv}  # --controller


def make_vec_env(
    n_envs: int = 8,
    seed: int | None = 0,
    vec_env: str = "dummy",
    vec_env_kwargs: dict[str, Any] | None = None,
    controller: str = "oneshot",
    **env_kwargs: Any,
) -> VecEnv:
    """``n_envs`` Monitor-wrapped copies of :class:`AdaPerceiverComputeEnv` in one SB3 ``VecEnv``.

    The backbone is loaded and (in table mode) the outcome table is built or loaded from the cache once, here in
    the parent process, and handed to every copy, so copies neither rebuild nor race on the cache.

    Args:
        n_envs: Number of copies (>= 1).
        seed: Base seed; copy ``r`` is seeded with ``seed + r`` (None: unseeded).
        vec_env: ``"dummy"`` (all copies in this process; fastest for table mode) or ``"subproc"``.
        vec_env_kwargs: Extra arguments of the VecEnv class (e.g. ``{"start_method": "fork"}``).
        controller: The episode form: ``"oneshot"`` (:class:`AdaPerceiverComputeEnv`) or ``"sequential"``
            (:class:`~envs.sequential_env.AdaPerceiverSequentialEnv`).
        **env_kwargs: Arguments of the environment class.

    Returns:
        The VecEnv (``num_envs == n_envs``).
    """
    if vec_env not in VEC_ENVS:
        raise ValueError(f"unknown vec_env {vec_env!r}; choose one of {list(VEC_ENVS)}")
    if isinstance(n_envs, bool) or not isinstance(n_envs, int) or n_envs < 1:
        raise ValueError(f"n_envs must be a positive integer, got {n_envs!r}")
    if controller not in EPISODES:
        raise ValueError(f"unknown controller {controller!r}; choose one of {list(EPISODES)}")
    kwargs = dict(env_kwargs)
    mode = kwargs.get("mode", "table")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    kwargs["backbone"] = resolve_backbone(kwargs.get("backbone"))
    if mode == "table" and kwargs.get("table") is None:
        # one validating construction in the parent resolves the split, checks the arguments and builds the table
        probe = AdaPerceiverComputeEnv(**{k: v for k, v in kwargs.items() if k != "decision_flops"})
        kwargs["table"] = probe.table
        probe.close()
    if mode == "table":
        kwargs.pop("dataset", None)  # copies only need the (already checked) table
    return sb3_make_vec_env(
        EPISODES[controller],
        n_envs=n_envs,
        seed=seed,
        env_kwargs=kwargs,
        vec_env_cls=VEC_ENVS[vec_env],
        vec_env_kwargs=vec_env_kwargs,
    )
