"""Train a PPO controller on the frozen backbone's environment, then score it on the test split.

The logic behind ``python train_policy.py``: outcome tables (cached per backbone hash) make every environment
step a lookup, so a run of a few hundred thousand one-step episodes takes minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger

from backbone.checkpoint import DEFAULT_BACKBONE, CheckpointError, load_backbone
from backbone.data import load_split
from backbone.data_source import resolve_data
from backbone.fileio import write_json
from backbone.settings_io import dump_yaml
from envs import OutcomeTable, SequentialSteps, get_observation, load_or_build, make_vec_env
from policy.cascade import OBSERVATION as CASCADE_OBSERVATION
from policy.cascade import save_cascade
from policy.config import PolicyConfig
from policy.controller import actor_flops, choose_actions, load_ppo, mlp_actor_flops, save_ppo_atomic
from policy.evaluation import choose_cascade, evaluate_actions, setting_prices
from policy.run_folder import PROGRESS, TIMING, ResumableCSV, Timing
from policy.sequential_rollout import rollout
from policy.sidecar import (
    CASCADE_JSON,
    CONTROLLER_FILES,
    POLICY_ZIP,
    SIDECAR,
    check_compatible,
    resolve_run,
    versions,
    write_sidecar,
)


def load_backbone_for(path: str | None):
    """The backbone a run uses, with an error that says how to get the default one."""
    path = Path(path) if path else DEFAULT_BACKBONE
    if not path.is_file():
        hint = "" if path != DEFAULT_BACKBONE else " (train it with `python -m backbone.train` or pass --backbone)"
        raise FileNotFoundError(f"backbone checkpoint not found: {path}{hint}")
    return load_backbone(path)


def outcome_table(model, cfg: PolicyConfig, split: str, limit: int, progress: bool = True) -> OutcomeTable:
    """Cached outcome table of ``split`` of ``cfg.data`` (first ``limit`` images when limit > 0).

    An image folder's split is read with the backbone's preprocessing (``policy-train``: exactly the hold-out its
    checkpoint records, or ``ROOT/policy-train/``) and built in resumable chunks on ``cfg.table_device``.
    """
    source = resolve_data(cfg.data, cfg.data_dir)
    source.check_backbone(model)
    dataset = load_split(split, cfg.data_dir) if source.builtin else source.split(split, model)
    if limit:
        dataset = dataset.subset(limit)
    return load_or_build(
        model,
        split,
        data_dir=cfg.data_dir,
        observation=cfg.observation,
        cache_dir=cfg.cache_dir,
        dataset=dataset,
        progress=progress,
        batch_size=cfg.table_batch_size,
        device=cfg.table_device,
        workers=cfg.workers,
    )


class _WandbWriter(KVWriter):
    """Forwards stable-baselines3's logger records (``rollout/``, ``train/``, ``time/``) to a wandb run."""

    def __init__(self, run) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.run.log({k: v for k, v in key_values.items() if isinstance(v, (int, float, np.number))}, step=step)

    def close(self) -> None:
        pass


class _AtomicCheckpoint(BaseCallback):
    """Every ``every`` timesteps write ``policy.zip`` + ``policy.json`` (+ timing) atomically, for ``--resume``."""

    def __init__(self, every: int, save) -> None:
        super().__init__()
        self.every, self.save, self.last = every, save, 0

    def _init_callback(self) -> None:
        self.last = self.num_timesteps  # a resumed run counts from where it was saved

    def _on_step(self) -> bool:
        if self.every > 0 and self.num_timesteps - self.last >= self.every:
            self.last = self.num_timesteps
            self.save(self.model)
        return True


class ControllerInterrupted(KeyboardInterrupt):
    """Ctrl-C during PPO: the policy was saved at ``timesteps`` in ``out`` and the run can be resumed."""

    def __init__(self, out: Path, timesteps: int) -> None:
        super().__init__(f"interrupted at {timesteps} timesteps")
        self.out, self.timesteps = out, timesteps


def run_folder(cfg: PolicyConfig, resume: str | None) -> Path:
    """The run folder: ``--resume RUN`` continues RUN itself; else ``cfg.out`` or ``runs/<run name>`` (cwd)."""
    if resume:
        if cfg.controller == "cascade":
            raise ValueError("a cascade is fitted in seconds and has nothing to resume; run it again without --resume")
        zip_path, _ = resolve_run(resume)
        if cfg.out and Path(cfg.out).resolve() != zip_path.parent.resolve():
            raise ValueError(f"--resume continues {zip_path.parent} in place; drop --out {cfg.out} or make it the same")
        return zip_path.parent
    out = Path(cfg.out) if cfg.out else Path("runs") / cfg.run_name()
    if any((out / name).exists() for name in CONTROLLER_FILES):
        raise ValueError(f"{out} already holds a controller; continue it with --resume {out} or choose another --out")
    return out


def train_controller(cfg: PolicyConfig, resume: str | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Train (or resume) a controller; write the run folder; return (run folder, eval metrics).

    Ctrl-C during PPO saves the policy and raises :class:`ControllerInterrupted` (resume with ``resume=out``).
    """
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    out = run_folder(cfg, resume)
    model = load_backbone_for(cfg.backbone)
    train_table = outcome_table(model, cfg, cfg.train_split, cfg.train_limit, progress)
    eval_table = outcome_table(model, cfg, cfg.eval_split, cfg.eval_limit, progress)
    t_tables = time.perf_counter() - t0
    if cfg.controller == "cascade":
        return _fit_cascade_run(cfg, out, model, train_table, eval_table, t_tables, t0)
    torch.set_num_threads(1)  # the controller MLP is tiny: one thread is fastest and keeps runs reproducible

    spec = get_observation(cfg.observation)
    sequential = cfg.controller == "sequential"
    steps = SequentialSteps.for_model(model, spec) if sequential else None
    episode: dict[str, Any] = {}
    if sequential:  # each stop/go decision is charged the decision network's FLOPs, known before it is built
        episode["decision_flops"] = mlp_actor_flops(steps.dim, list(cfg.net_arch), sum(steps.action_nvec))
        steps = dataclasses.replace(steps, decision_flops=episode["decision_flops"])
    vec = make_vec_env(
        n_envs=cfg.n_envs,
        seed=cfg.seed,
        vec_env=cfg.vec_env,
        backbone=model,
        split=cfg.train_split,
        flops_penalty=cfg.flops_penalty,
        reward=cfg.reward,
        observation=cfg.observation,
        table=train_table,
        controller=cfg.controller,
        **episode,
    )
    grid = model.grid
    if resume:
        zip_path, sidecar = resolve_run(resume)
        check_compatible(sidecar, model.checkpoint_sha256, grid, cfg.observation)
        if sidecar.get("controller", "oneshot") != cfg.controller:
            raise ValueError(
                f"{resume} holds a {sidecar.get('controller', 'oneshot')} controller, not {cfg.controller}"
            )
        ppo = load_ppo(zip_path, env=vec, device=cfg.device)
    else:
        ppo = new_ppo(cfg, vec)
    if sequential and actor_flops(ppo.policy) != episode["decision_flops"]:
        raise RuntimeError(f"decision network has {actor_flops(ppo.policy)} FLOPs, the env charged {episode}")
    controller_flops = int(train_table.obs_flops) + actor_flops(ppo.policy)  # observation + (first) decision
    sidecar_base = {
        **_run_identity(cfg, model),
        "observation": cfg.observation,
        "controller": cfg.controller,
        **episode,
        "obs_dim": int(steps.dim if sequential else train_table.obs.shape[1]),
        "obs_flops": int(train_table.obs_flops),
        "actor_flops": actor_flops(ppo.policy),
        "controller_flops": controller_flops,
        "reward": cfg.reward,
    }
    start_timesteps = int(ppo.num_timesteps)
    timing = Timing(out / TIMING, resume=bool(resume))
    t1 = time.perf_counter()

    def part() -> dict[str, Any]:
        now = time.perf_counter()
        return {"tables_s": t_tables, "ppo_s": now - t1, "total_s": now - t0, "timesteps_from": start_timesteps,
                "timesteps_to": int(ppo.num_timesteps)}  # fmt: skip

    def save(ppo_model: PPO) -> None:
        save_ppo_atomic(ppo_model, out / POLICY_ZIP)
        write_sidecar(out / SIDECAR, {**sidecar_base, "timesteps": int(ppo_model.num_timesteps)})
        timing.write(part())

    run = _init_wandb(cfg, out)
    writers = [ResumableCSV(out / PROGRESS, keep_until=start_timesteps)] + ([_WandbWriter(run)] if run else [])
    ppo.set_logger(Logger(str(out), writers))
    dump_yaml(cfg, out / "config.yaml")
    remaining = cfg.timesteps - ppo.num_timesteps
    try:
        if remaining > 0:
            ppo.learn(
                remaining,
                callback=_AtomicCheckpoint(cfg.checkpoint_every, save),
                progress_bar=progress,
                reset_num_timesteps=not resume,
            )
    except KeyboardInterrupt:
        save(ppo)
        vec.close()
        raise ControllerInterrupted(out, int(ppo.num_timesteps)) from None
    save(ppo)
    vec.close()
    for writer in writers:
        writer.close()

    metrics = score_controller(ppo.policy, eval_table, model, cfg.observation, controller_flops, steps)
    metrics = {
        "split": cfg.eval_split,
        "controller": cfg.controller,
        "flops_penalty": cfg.flops_penalty,
        "seed": cfg.seed,
        "timesteps": int(ppo.num_timesteps),
        **metrics,
    }
    write_json(out / "eval.json", metrics)
    timing.write(part())
    if run is not None:
        run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.finish()
    return out, metrics


def _run_identity(cfg: PolicyConfig, model) -> dict[str, Any]:
    """What every controller's ``policy.json`` records: the backbone, task and grid it belongs to, and its run."""
    return {
        "backbone_path": None if cfg.backbone is None else str(Path(cfg.backbone).resolve()),  # None = shipped
        "backbone_sha256": model.checkpoint_sha256,
        "data": None if cfg.task == "fmnist" else str(Path(cfg.data).expanduser().resolve()),  # None = fmnist
        "grid": model.grid.to_json(),
        "flops_penalty": cfg.flops_penalty,
        "seed": cfg.seed,
        "train_split": cfg.train_split,
        "versions": versions(),
    }


def _fit_cascade_run(cfg: PolicyConfig, out: Path, model, train_table: OutcomeTable, eval_table: OutcomeTable,
                     t_tables: float, t0: float) -> tuple[Path, dict]:  # fmt: skip
    """``--controller cascade``: fit (tau, X) on policy-train, write the run folder, score it on ``eval_table``
    (:func:`policy.evaluation.choose_cascade`, what the ablation does for every penalty)."""
    chosen = choose_cascade(model, train_table, eval_table, cfg.flops_penalty)
    spec = get_observation(CASCADE_OBSERVATION)
    controller_flops = spec.flops(model)  # the probe and its statistics; the comparison with tau counts 0
    out.mkdir(parents=True, exist_ok=True)
    save_cascade(chosen["cascade"], out / CASCADE_JSON)
    write_sidecar(out / SIDECAR, {
        **_run_identity(cfg, model),
        "observation": CASCADE_OBSERVATION,
        "controller": "cascade",
        "obs_dim": spec.dim(model),
        "obs_flops": controller_flops,
        "actor_flops": 0,
        "controller_flops": controller_flops,
        "train_accuracy": chosen["train_accuracy"],
        "train_mean_flops": chosen["train_mean_flops"],
    })  # fmt: skip
    dump_yaml(cfg, out / "config.yaml")
    metrics = {"split": cfg.eval_split, "controller": "cascade", "flops_penalty": cfg.flops_penalty, "seed": cfg.seed,
               "tau": chosen["tau"], "setting": chosen["setting"], **chosen["metrics"]}  # fmt: skip
    write_json(out / "eval.json", metrics)
    now = time.perf_counter()
    Timing(out / TIMING, resume=False).write({"tables_s": t_tables, "fit_s": now - t0 - t_tables, "total_s": now - t0})
    return out, metrics


def new_ppo(cfg: PolicyConfig, vec) -> PPO:
    """A fresh PPO learner with the recipe of ``cfg`` on the vectorised environment ``vec``."""
    return PPO(
        "MlpPolicy",
        vec,
        learning_rate=cfg.learning_rate,
        n_steps=cfg.n_steps,
        batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs,
        gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        clip_range=cfg.clip_range,
        ent_coef=cfg.ent_coef,
        vf_coef=cfg.vf_coef,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        policy_kwargs={"net_arch": {"pi": list(cfg.net_arch), "vf": list(cfg.net_arch)}},
        device=cfg.device,
    )


def controller_actions(policy, table: OutcomeTable, steps: SequentialSteps | None = None) -> np.ndarray:
    """The setting indices ``(n, grid.ndim)`` the controller deterministically runs each sample of ``table`` at
    (one-shot, or the exit of its sequential episode when ``steps`` is given)."""
    if steps is None:
        return choose_actions(policy, table.obs)
    return rollout(table, steps, lambda obs: choose_actions(policy, obs))


def score_controller(policy, table: OutcomeTable, model, observation: str, controller_flops: int,
                     steps: SequentialSteps | None = None) -> dict[str, Any]:  # fmt: skip
    """The controller's deterministic choices on ``table``, scored (one-shot, or sequential when ``steps``)."""
    priced, reused = setting_prices(model, get_observation(observation), steps)
    return evaluate_actions(table, controller_actions(policy, table, steps), controller_flops, reused, priced)


def _init_wandb(cfg: PolicyConfig, out: Path):
    if cfg.wandb == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.wandb_project, mode=cfg.wandb, config=dataclasses.asdict(cfg), dir=str(out), name=out.name
    )


__all__ = [
    "CheckpointError",
    "ControllerInterrupted",
    "controller_actions",
    "load_backbone_for",
    "outcome_table",
    "score_controller",
    "train_controller",
]
