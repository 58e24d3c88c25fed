"""Options of a controller run: dataclass defaults <- ``configs/policy.yaml`` <- command line."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbone.distributed import local_device
from backbone.fileio import packaged_file
from backbone.option_checks import check_int, check_number
from backbone.settings_io import build_dataclass, load_yaml, merge

DEFAULT_POLICY_CONFIG = packaged_file("configs", "policy.yaml")
REWARDS = ("correct", "neg_ce")
PPO_CONTROLLERS = ("oneshot", "sequential")
CONTROLLERS = (*PPO_CONTROLLERS, "cascade")  # the cascade is fitted without PPO (policy.cascade)
WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class PolicyConfig:
    """Everything that decides a controller run; saved as ``config.yaml`` in the run folder."""

    flops_penalty: float = 0.3  # reward = correct - penalty * FLOPs(setting) / FLOPs(full)
    controller: str = "oneshot"  # oneshot: the whole setting from cheap features | sequential: then stop/go per block
    # | cascade: no PPO, the probe's answer if its top-1 probability >= tau, else one setting (policy.cascade)
    backbone: str | None = None  # backbone .safetensors (None = the shipped checkpoint)
    data: str | None = None  # task: None/fmnist (Fashion-MNIST) or an image-folder root ROOT/<split>/<class>/<image>
    data_dir: str | None = None  # Fashion-MNIST folder (None = $ADAPERCEIVER_DATA_DIR or Debian's path)
    train_split: str = "policy-train"  # split the controller learns on (held out from the backbone)
    eval_split: str = "test"  # split of the final report
    train_limit: int = 0  # use the first n training images only (0 = all); for smoke tests
    eval_limit: int = 0  # evaluate on the first n images only (0 = all)
    timesteps: int = 300_000  # PPO environment steps (= episodes = images seen)
    n_envs: int = 8  # parallel environment copies
    vec_env: str = "dummy"  # dummy | subproc
    seed: int = 0  # seeds PPO, the environments and torch
    reward: str = "correct"  # correct | neg_ce
    observation: str = "pooled_probe"  # observation spec (envs.OBSERVATIONS)
    learning_rate: float = 3e-4  # PPO Adam step size
    n_steps: int = 256  # rollout length per env
    batch_size: int = 256  # PPO minibatch
    n_epochs: int = 10  # PPO epochs per rollout
    gamma: float = 1.0  # no future after the single step
    gae_lambda: float = 1.0  # advantage = reward - V(obs)
    clip_range: float = 0.2  # PPO ratio clip
    ent_coef: float = 0.001  # entropy bonus (configs/policy.yaml)
    vf_coef: float = 0.5  # value-loss weight
    max_grad_norm: float = 0.5  # gradient clip
    net_arch: list[int] = field(default_factory=lambda: [64, 64])  # hidden sizes of the policy and value MLPs
    checkpoint_every: int = 50_000  # timesteps between atomic policy checkpoints
    out: str | None = None  # run folder (None = runs/<run_name()> in the working directory)
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "adaperceiver-rl"
    device: str = "cpu"  # torch device of the controller (the MLP is tiny: cpu is fastest)
    cache_dir: str | None = None  # outcome-table cache (None = $ADAPERCEIVER_CACHE_DIR or ~/.cache/.../tables)
    table_device: str = "cpu"  # torch device of the backbone while outcome tables are built (e.g. cuda)
    table_batch_size: int = 500  # images per forward pass while outcome tables are built
    workers: int = 2  # DataLoader worker processes reading image folders

    def __post_init__(self) -> None:
        if not isinstance(self.flops_penalty, (int, float)) or not math.isfinite(self.flops_penalty):
            raise ValueError(f"--flops-penalty must be a finite number, got {self.flops_penalty!r}")
        if self.flops_penalty < 0:
            raise ValueError(f"--flops-penalty must be >= 0, got {self.flops_penalty}")
        if self.reward not in REWARDS:
            raise ValueError(f"--reward must be one of {list(REWARDS)}, got {self.reward!r}")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"--controller must be one of {list(CONTROLLERS)}, got {self.controller!r}")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"--wandb must be one of {list(WANDB_MODES)}, got {self.wandb!r}")
        if self.vec_env not in ("dummy", "subproc"):
            raise ValueError(f"vec_env must be 'dummy' or 'subproc', got {self.vec_env!r}")
        for name in ("timesteps", "n_envs", "n_steps", "batch_size", "n_epochs", "table_batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("train_limit", "eval_limit", "seed", "checkpoint_every", "workers"):
            check_int(name, getattr(self, name), 0)
        check_number("learning_rate", self.learning_rate, 0.0, low_open=True)
        for name in ("gamma", "gae_lambda"):
            check_number(name, getattr(self, name), 0.0, 1.0)
        check_number("clip_range", self.clip_range, 0.0, low_open=True)
        check_number("max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        for name in ("ent_coef", "vf_coef"):
            check_number(name, getattr(self, name), 0.0)
        for name in ("device", "table_device"):  # one line, not a torch traceback or SB3's silent fall back to cpu
            local_device(getattr(self, name))
        if not isinstance(self.net_arch, list) or not self.net_arch:
            raise ValueError(f"net_arch must be a non-empty list of layer sizes, got {self.net_arch!r}")
        for size in self.net_arch:
            check_int("each net_arch size", size, 1)

    def run_name(self) -> str:
        """cleanrl-style ``{task}__[sequential__]p{penalty}__s{seed}__{time}`` (task: ``fmnist`` or the image
        folder's name)."""
        kind = "" if self.controller == "oneshot" else f"{self.controller}__"
        return f"{self.task}__{kind}p{self.flops_penalty:g}__s{self.seed}__{time.strftime('%Y%m%d-%H%M%S')}"

    @property
    def task(self) -> str:
        """``fmnist``, or the name of the ``data`` folder (made safe for a folder name)."""
        if self.data is None or self.data == "fmnist":
            return "fmnist"
        name = Path(self.data).expanduser().resolve().name
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "data"


def build_policy_config(config_path: str | Path | None = DEFAULT_POLICY_CONFIG, **overrides: Any) -> PolicyConfig:
    """Defaults, then the YAML file, then the non-None ``overrides`` (command-line options)."""
    values = load_yaml(config_path) if config_path else {}
    values = merge(values, {k: v for k, v in overrides.items() if v is not None})
    return build_dataclass(PolicyConfig, values, source=str(config_path or "options"))


def check_penalties(penalties: list[float]) -> None:
    """ValueError unless every penalty of a sweep is finite and >= 0 (one flag, many values: ablation, reference)."""
    for p in penalties:
        if not math.isfinite(p) or p < 0:
            raise ValueError(f"penalties must be finite and >= 0, got {p}")
