"""Gymnasium environment: pick the compute setting of a frozen AdaPerceiver for one image (DESIGN §5)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from backbone.checkpoint import DEFAULT_BACKBONE, CheckpointError, load_backbone
from backbone.data import SPLITS, ImageDataset, load_split
from backbone.data_source import resolve_data
from backbone.folder_split import FolderSplit
from backbone.model import AdaPerceiver
from backbone.settings import Setting
from envs.observations import DEFAULT_OBSERVATION, OBSERVATIONS, get_observation, observe_embed
from envs.outcome_table import OutcomeTable, dataset_sha256, load_or_build

REWARDS = ("correct", "neg_ce")
MODES = ("table", "live")


def resolve_backbone(backbone: str | os.PathLike | AdaPerceiver | None) -> AdaPerceiver:
    """``None`` -> the default checkpoint, a path -> :func:`backbone.load_backbone`, a model -> itself."""
    if isinstance(backbone, AdaPerceiver):
        return backbone
    if backbone is None or isinstance(backbone, (str, os.PathLike)):
        path = DEFAULT_BACKBONE if backbone is None else backbone
        try:
            return load_backbone(path)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}; train one with `python -m backbone.train` or pass backbone=<path or AdaPerceiver>"
            ) from None
    raise TypeError(f"backbone must be None, a checkpoint path or an AdaPerceiver, got {type(backbone).__name__}")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class AdaPerceiverComputeEnv(gym.Env[np.ndarray, np.ndarray]):
    """Choose how much compute a frozen AdaPerceiver spends on one image.

    ## Description

    The backbone runs at any setting ``(tokens g, depth d, width w)`` of a ``K x L x M`` grid: fewer latent tokens,
    an earlier exit or a narrower FFN cost fewer FLOPs and may lose accuracy. Each episode draws one image of a data
    split; the agent sees cheap features of it and picks the setting the backbone then classifies it at. A good
    policy spends the full setting only on images that need it.

    In ``mode="table"`` (default) every (sample, setting) outcome is precomputed once per backbone and split in an
    :class:`~envs.outcome_table.OutcomeTable` (cached on disk), so a step is a lookup. ``mode="live"`` runs the
    backbone on every reset/step instead and gives the same rewards.

    ## Action Space

    ``MultiDiscrete([K, L, M])``: ``(token index, depth index, width index)``, or ``MultiDiscrete([S, K, L, M])``
    with a leading input-stage index for a backbone with stem exits (``cfg.stem_exits``). Token index ``k`` selects
    ``cfg.token_granularities[k]`` latents, depth index ``l`` runs ``l + 1`` blocks, width index ``m`` selects FFN
    width ``cfg.widths[m]``, stage index ``s`` runs ``cfg.stages[s]`` stem convolutions. ``env.grid`` (a
    :class:`~backbone.settings.SettingsGrid`) converts and prices them.

    ## Observation Space

    ``Box(low, high, (F,), float32)`` with finite bounds, given by the observation spec (``env.observation_spec``):

    | spec                     | features                                                                   |
    |--------------------------|----------------------------------------------------------------------------|
    | ``pooled_probe`` (default)| layer-normed mean patch embedding (``D``, in ``+-sqrt(D)``) + probe stats |
    | ``pooled``               | layer-normed mean patch embedding only                                     |
    | ``probe``                | top-1 probability [0, 1], top-1 - top-2 margin [0, 1], entropy [0, log C] |

    The probe statistics come from the cheapest setting run from the same patch memory. The controller-overhead
    FLOPs of one observation are ``env.obs_flops`` (reported separately, not part of the reward).

    ## Rewards

    ``correct - flops_penalty * FLOPs(setting) / FLOPs(full setting)`` where ``correct`` is 1.0 when the prediction
    equals the label, else 0.0. With ``reward="neg_ce"`` the negative cross-entropy of the label replaces
    ``correct``. So the full setting costs ``flops_penalty`` and the cheapest setting a small fraction of it.

    ## Starting State

    ``reset`` draws a sample index uniformly from the split with ``self.np_random`` (or takes
    ``options={"sample_index": i}``) and returns its observation and ``{"sample_index": i}``.

    ## Episode End

    Every episode is one step: ``terminated=True``, ``truncated=False``. ``info`` holds ``tokens``, ``depth``,
    ``width`` and ``flops`` of the chosen setting, ``correct``, ``pred``, ``label`` and ``sample_index``.

    ## Arguments

    ```python
    import gymnasium as gym
    import envs  # registers the id

    env = gym.make("AdaPerceiverCompute-v0", flops_penalty=0.3)
    ```

    * ``backbone``: ``None`` (the default checkpoint ``checkpoints/adaperceiver_fmnist.safetensors``), a checkpoint
      path or an :class:`~backbone.model.AdaPerceiver`.
    * ``split``: ``"policy-train"`` (default), ``"backbone-train"`` or ``"test"``; the name of ``dataset`` if given.
    * ``flops_penalty``: Finite, ``>= 0``; weight of the relative FLOPs in the reward.
    * ``reward``: ``"correct"`` (default) or ``"neg_ce"``.
    * ``mode``: ``"table"`` (default) or ``"live"``.
    * ``observation``: Observation spec name, ``"pooled_probe"`` (default), ``"pooled"`` or ``"probe"``.
    * ``data``: The task: ``None`` or ``"fmnist"`` (Fashion-MNIST), or an image-folder root
      ``ROOT/<split>/<class>/<image>`` (``backbone.data_source``): ``split`` is then read from it with the backbone's
      preprocessing (``policy-train``: ``ROOT/policy-train/`` or the hold-out of ``ROOT/train/`` recorded in the
      backbone). A backbone whose class names or count differ from the data's is refused.
    * ``data_dir``: Fashion-MNIST folder (default ``$ADAPERCEIVER_DATA_DIR`` or Debian's path).
    * ``table``: A prebuilt outcome table to share between vectorised copies; must match backbone/split/observation.
    * ``cache_dir``: Root of the outcome-table cache (default ``$ADAPERCEIVER_CACHE_DIR`` or
      ``~/.cache/adaperceiver-rl/tables``).
    * ``dataset``: An :class:`~backbone.data.ImageDataset` used instead of loading ``split``.
    * ``render_mode``: Must be ``None`` (nothing to render).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        backbone: str | os.PathLike | AdaPerceiver | None = None,
        split: str = "policy-train",
        flops_penalty: float = 0.3,
        reward: str = "correct",
        mode: str = "table",
        observation: str = DEFAULT_OBSERVATION,
        data_dir: str | os.PathLike | None = None,
        table: OutcomeTable | None = None,
        cache_dir: str | os.PathLike | None = None,
        dataset: ImageDataset | None = None,
        render_mode: str | None = None,
        data: str | os.PathLike | None = None,
    ) -> None:
        # --- cheap argument checks first (before any file is read) ------------------------------------------------
        if isinstance(flops_penalty, bool) or not isinstance(flops_penalty, (int, float, np.integer, np.floating)):
            raise ValueError(f"flops_penalty must be a finite number >= 0, got {flops_penalty!r}")
        if not math.isfinite(flops_penalty) or flops_penalty < 0:
            raise ValueError(f"flops_penalty must be a finite number >= 0, got {flops_penalty!r}")
        if not isinstance(reward, str) or reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose one of {list(REWARDS)}")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        if not isinstance(observation, str) or observation not in OBSERVATIONS:
            raise ValueError(f"unknown observation {observation!r}; choose one of {list(OBSERVATIONS)}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty name, one of {list(SPLITS)}; got {split!r}")
        needs_split_data = dataset is None and (mode == "live" or table is None)
        if needs_split_data and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)} (or pass dataset=)")
        if dataset is not None and len(dataset) == 0:
            raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} is empty")
        if render_mode is not None:
            raise ValueError(f"render_mode={render_mode!r} is not supported; this environment has no render modes")
        if table is not None and not isinstance(table, OutcomeTable):
            raise ValueError(f"table must be an OutcomeTable, got {type(table).__name__}")

        self.model = resolve_backbone(backbone)
        source = resolve_data(data, data_dir) if dataset is None and data is not None else None
        if source is not None:
            source.check_backbone(self.model)
            if not source.builtin and (mode == "live" or table is None):
                dataset = source.split(split, self.model)  # streamed from disk for a table, in memory when live
        self.split, self.mode, self.reward_type = split, mode, reward
        self.flops_penalty = float(flops_penalty)
        self.observation_spec = get_observation(observation)
        self.render_mode = render_mode
        if table is not None:
            table.check_matches(self.model, split, observation)
            if dataset is not None and table.data_sha256 and table.data_sha256 != dataset_sha256(dataset):
                raise ValueError(f"outcome table for {table.split!r} was built from other samples than `dataset`")

        # --- the data this mode needs -----------------------------------------------------------------------------
        self.table: OutcomeTable | None = table
        if mode == "table" and table is None:
            self.table = load_or_build(self.model, split, data_dir, observation, cache_dir, dataset)
        if mode == "live":
            if isinstance(dataset, FolderSplit):
                dataset = dataset.read_all(progress=False)[0]
            samples = dataset if dataset is not None else load_split(split, data_dir)
            self._images = samples.as_float()
            self._labels_list: list[int] = samples.labels.tolist()
            self._n = len(samples)
        else:
            self._n = len(self.table)

        self.grid = self.model.grid
        self.obs_flops = int(self.observation_spec.flops(self.model))
        self._shape = self.grid.shape
        self._action_shape = (self.grid.ndim,)
        self._cost = self.flops_penalty * self.grid.relative_cost()  # (K, L, M) float64

        self.action_space = spaces.MultiDiscrete(list(self._shape))
        spec, model = self.observation_spec, self.model
        self.observation_space = spaces.Box(spec.low(model), spec.high(model), dtype=np.float32)

        if self.table is not None and mode == "table":
            t = self.table
            self._rewards = t.reward_matrix(reward, self.flops_penalty)  # (n, K, L, M): the hot path looks up here
            self._obs_table = np.ascontiguousarray(t.obs, dtype=np.float32)
            self._correct, self._pred = t.correct, t.pred
            self._labels_list = t.labels.tolist()
        self._index = -1  # sample of the running episode; -1 = no episode (reset() not called or episode over)
        self._obs: np.ndarray | None = None
        self._memory = None

    # --- helpers -----------------------------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        """Number of samples an episode can draw from."""
        return self._n

    def setting(self, action: Any) -> Setting:
        """``(tokens, depth, width)`` of an action."""
        return self.grid.setting(self._parse_action(action))

    def _parse_action(self, action: Any) -> tuple[int, ...]:
        """Cheap conversion + bounds check (no ``action_space.contains`` in the hot path)."""
        if type(action) is np.ndarray and action.shape == self._action_shape and action.dtype.kind in "iu":
            index = tuple(action.tolist())
            if all(0 <= i < n for i, n in zip(index, self._shape, strict=True)):
                return index
        return self.grid.check_index(self._parse_action_slow(action))  # ValueError naming the bounds

    def _parse_action_slow(self, action: Any) -> tuple[int, ...]:
        names = ", ".join(self.grid.axes)
        want = f"{self.grid.ndim} integers ({names} index) within MultiDiscrete({list(self._shape)})"
        if isinstance(action, torch.Tensor):
            action = action.detach().cpu().numpy()
        try:
            arr = np.asarray(action)
        except Exception:
            raise ValueError(f"action must be {want}, got {action!r}") from None
        if arr.shape != self._action_shape:
            raise ValueError(f"action must be {want}, got shape {arr.shape}: {action!r}")
        if arr.dtype.kind in "iu":
            return tuple(arr.tolist())
        if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
            return tuple(int(v) for v in arr.tolist())
        raise ValueError(f"action must be {want}, got non-integer values {action!r}")

    def _reset_index(self, options: dict[str, Any] | None) -> int:
        if options and options.get("sample_index") is not None:
            i = options["sample_index"]
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self._n:
                raise ValueError(f"options['sample_index'] must be an integer in 0..{self._n - 1}, got {i!r}")
            return int(i)
        return int(self.np_random.integers(self._n))

    # --- Gymnasium API -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        i = self._reset_index(options)
        self._index = i
        if self.mode == "table":
            self._obs = self._obs_table[i].copy()
        else:
            with _eval_mode(self.model):
                self._memory = observe_embed(self.model, self._images[i : i + 1])
                self._obs = self.observation_spec.compute(self.model, self._memory)[0].numpy()
        return self._obs.copy(), {"sample_index": i}

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        i = self._index
        if i < 0:
            raise RuntimeError("call reset() before step(): each episode is one step and needs a fresh reset()")
        index = self._parse_action(action)
        self._index = -1
        label = self._labels_list[i]
        at = (i, *index)
        if self.mode == "table":
            reward = float(self._rewards[at])
            correct = bool(self._correct[at])
            pred = int(self._pred[at])
        else:
            correct, pred, ce = self._run_live(index, label)
            base = float(correct) if self.reward_type == "correct" else -ce
            reward = base - float(self._cost[index])
        setting = self.grid.setting(index)
        info = {
            **{k: v for k, v in setting._asdict().items() if v is not None},
            "flops": int(self.grid.flops[index]),
            "correct": correct,
            "pred": pred,
            "label": label,
            "sample_index": i,
        }
        return self._obs.copy(), reward, True, False, info

    def _run_live(self, index: tuple[int, ...], label: int) -> tuple[bool, int, float]:
        """Run the backbone at the chosen setting from the memory computed at reset (continuing its stem to a
        deeper stage if the setting has one): (correct, pred, CE)."""
        with _eval_mode(self.model):
            logits = self.model(self._memory, *self.grid.setting(index)).float()
            ce = float(F.cross_entropy(logits, torch.tensor([label])))
        pred = int(logits[0].argmax())
        return pred == label, pred, ce

    def render(self) -> None:
        """Nothing to render (``metadata["render_modes"]`` is empty)."""
        return None
