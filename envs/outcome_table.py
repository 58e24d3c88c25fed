"""Outcome table: the frozen backbone's result for every (sample, setting) of a split, plus the observations.

The backbone is frozen, so whether setting ``(g, d, w)`` gets sample ``i`` right never changes (DESIGN §5). The table
holds correctness, cross-entropy and prediction of every sample at every setting (one ``forward_all`` pass per width
gives all granularities and depths), the observation of every sample and the FLOPs of every setting; the environment's
``step()`` becomes a lookup. Tables are cached on disk keyed by the backbone's identity (the checkpoint's sha256)::

    <cache_dir>/<sha256[:16]>/<split>__<observation>__n<N>.npz
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from backbone.data import ImageDataset, load_split
from backbone.fileio import atomic_write, user_cache_dir
from backbone.folder_split import FolderSplit
from backbone.model import AdaPerceiver
from backbone.settings import SettingsGrid
from backbone.sweep import sweep
from envs.observations import DEFAULT_OBSERVATION, get_observation, observe_embed

FORMAT = "adaperceiver-rl/outcome-table"
FORMAT_VERSION = 3  # 3: margin and entropy of every setting (the sequential controller observes them)
CACHE_DIR_ENV = "ADAPERCEIVER_CACHE_DIR"
ARRAYS = ("correct", "loss", "pred", "confidence", "margin", "entropy", "labels", "obs")  # per sample, in a table
CHUNK_SIZE = 2048  # images per chunk file of an image-folder table (envs/table_chunks.py)


def backbone_identity(model: AdaPerceiver) -> str:
    """The backbone's identity: its checkpoint file's sha256, else a sha256 of its weights and config.

    Models loaded with :func:`backbone.load_backbone` carry ``checkpoint_sha256``; in-memory models (tests, a model
    just trained) are hashed from their state_dict tensors (name, dtype, shape and bytes) plus the config JSON, so
    they too get a stable key that changes whenever a weight does.
    """
    sha = getattr(model, "checkpoint_sha256", None)
    if sha:
        return str(sha)
    h = hashlib.sha256(model.cfg.to_json().encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_sha256(dataset: ImageDataset | FolderSplit) -> str:
    """sha256 of a dataset's images and labels (tells a custom dataset apart from the named split); an image-folder
    split is named by :meth:`FolderSplit.fingerprint` instead (its files are not read into memory)."""
    if isinstance(dataset, FolderSplit):
        return dataset.fingerprint()
    h = hashlib.sha256()
    h.update(dataset.images.contiguous().numpy().tobytes())
    h.update(dataset.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$ADAPERCEIVER_CACHE_DIR`` if set, else ``tables/`` in the user cache folder (``~/.cache/adaperceiver-rl``)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else user_cache_dir("tables")


@dataclass
class OutcomeTable:
    """Per-sample outcome of every setting of a split, with the observations and FLOPs the environment needs.

    Attributes:
        correct: ``(n, *grid.shape)`` bool, argmax == label at (sample, setting index), e.g. ``(n, K, L, M)``.
        loss: ``(n, *grid.shape)`` float32 cross-entropy.
        pred: ``(n, *grid.shape)`` int16 predicted class.
        confidence: ``(n, *grid.shape)`` float32 top-1 softmax probability (for the confidence early-exit baseline).
        margin: ``(n, *grid.shape)`` float32 top-1 minus top-2 probability.
        entropy: ``(n, *grid.shape)`` float32 softmax entropy (nats).
        labels: ``(n,)`` int64 true class.
        obs: ``(n, F)`` float32 observation of each sample.
        grid: The backbone's :class:`~backbone.settings.SettingsGrid` (axes and FLOPs of every setting).
        obs_flops: Controller-overhead FLOPs per image of computing one observation.
        backbone_sha256: :func:`backbone_identity` of the backbone that produced it.
        split: Name of the split (or custom dataset) the samples come from.
        observation: Name of the observation spec.
        data_sha256: :func:`dataset_sha256` of the samples ("" if unknown).
    """

    correct: np.ndarray
    loss: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    labels: np.ndarray
    obs: np.ndarray
    grid: SettingsGrid
    obs_flops: int
    backbone_sha256: str
    split: str
    observation: str
    data_sha256: str = ""

    def __post_init__(self) -> None:
        n = len(self.labels)
        shape = (n, *self.grid.shape)
        for name in ("correct", "loss", "pred", "confidence", "margin", "entropy"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"outcome table: {name} has shape {getattr(self, name).shape}, expected {shape}")
        if self.obs.ndim != 2 or len(self.obs) != n:
            raise ValueError(f"outcome table: obs has shape {self.obs.shape}, expected ({n}, F)")
        if n == 0:
            raise ValueError("outcome table is empty (0 samples)")

    # --- building ------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: AdaPerceiver,
        dataset: ImageDataset,
        split: str,
        observation: str = DEFAULT_OBSERVATION,
        batch_size: int = 500,
        progress: bool = True,
    ) -> OutcomeTable:
        """Evaluate every setting on every sample of ``dataset`` and compute the observations.

        Args:
            model: The frozen backbone.
            dataset: The samples (e.g. ``load_split(split)``).
            split: Name recorded in the table (and checked when it is reused).
            observation: Name of an :data:`~envs.observations.OBSERVATIONS` spec.
            batch_size: Images per forward pass.
            progress: Show tqdm bars.

        Returns:
            The table; nothing is written to disk (see :func:`load_or_build`).
        """
        spec = get_observation(observation)
        if len(dataset) == 0:
            raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} is empty")
        images, labels = dataset.as_float(), dataset.labels
        result = sweep(model, images, labels, batch_size=batch_size, progress=progress)
        obs = np.zeros((len(images), spec.dim(model)), np.float32)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                starts = range(0, len(images), batch_size)
                for s in tqdm(starts, desc="observations", unit="batch", disable=not progress):
                    memory = observe_embed(model, images[s : s + batch_size].to(next(model.parameters()).device))
                    obs[s : s + batch_size] = spec.compute(model, memory).cpu().numpy()
        finally:
            model.train(was_training)
        return cls(
            correct=result.correct,
            loss=result.loss,
            pred=result.pred,
            confidence=result.confidence,
            margin=result.margin,
            entropy=result.entropy,
            labels=labels.numpy().astype(np.int64),
            obs=obs,
            grid=model.grid,
            obs_flops=int(spec.flops(model)),
            backbone_sha256=backbone_identity(model),
            split=split,
            observation=observation,
            data_sha256=dataset_sha256(dataset),
        )

    # --- queries -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def flops(self) -> np.ndarray:
        """FLOPs per image of every setting, shape ``grid.shape`` (``grid.flops``)."""
        return self.grid.flops

    def subset(self, index: np.ndarray) -> OutcomeTable:
        """The samples ``index`` (e.g. the folds of a cross-validation) as a table of their own (copies)."""
        index = np.asarray(index)
        subset = {name: getattr(self, name)[index] for name in ARRAYS}
        return dataclasses.replace(self, **subset, data_sha256="")  # "" = not the named split's whole sample

    def accuracy(self) -> np.ndarray:
        """Accuracy of every fixed setting over the table's samples, shape ``grid.shape``."""
        return self.correct.mean(0)

    def reward_matrix(self, reward: str = "correct", flops_penalty: float = 0.3) -> np.ndarray:
        """Reward ``(n, *grid.shape)`` float64 of every (sample, setting), read-only and memoised per argument pair.

        ``correct - flops_penalty * FLOPs / FLOPs(full)`` (``-loss`` in place of ``correct`` for ``"neg_ce"``);
        vectorised copies of the environment that share this table share one matrix.
        """
        if reward not in ("correct", "neg_ce"):
            raise ValueError(f"unknown reward {reward!r}; choose one of ['correct', 'neg_ce']")
        cache = self.__dict__.setdefault("_reward_cache", {})
        key = (reward, float(flops_penalty))
        if key not in cache:
            base = self.correct.astype(np.float64) if reward == "correct" else -self.loss.astype(np.float64)
            matrix = base - flops_penalty * self.grid.relative_cost()[None]
            matrix.setflags(write=False)
            cache[key] = matrix
        return cache[key]

    def mismatch(self, model: AdaPerceiver, split: str, observation: str | None = None) -> str | None:
        """Why this table cannot be used for ``model`` on ``split`` (with ``observation``), or None if it can."""
        sha = backbone_identity(model)
        if self.backbone_sha256 != sha:
            return f"it was built for backbone {self.backbone_sha256[:16]}, not {sha[:16]}"
        if self.split != split:
            return f"it was built for split {self.split!r}, not {split!r}"
        if observation is not None and self.observation != observation:
            return f"it holds observation {self.observation!r}, not {observation!r}"
        if self.grid != model.grid:
            return f"its settings grid {self.grid.to_json()} differs from the backbone's {model.grid.to_json()}"
        return None

    def check_matches(self, model: AdaPerceiver, split: str, observation: str | None = None) -> None:
        """Raise ValueError unless the table was built for this backbone, split (and observation)."""
        why = self.mismatch(model, split, observation)
        if why is not None:
            raise ValueError(
                f"outcome table ({self.split}, {self.observation}, n={len(self)}) does not match: {why}; "
                "rebuild it with envs.load_or_build(...) or OutcomeTable.build(...)"
            )

    # --- disk ----------------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "obs_flops": int(self.obs_flops),
            "backbone_sha256": self.backbone_sha256,
            "split": self.split,
            "observation": self.observation,
            "grid": self.grid.to_json(),
            "data_sha256": self.data_sha256,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table atomically as ``.npz`` (metadata as a JSON string array); return the path."""
        path = Path(path)
        arrays = {name: getattr(self, name) for name in ARRAYS} | {"flops": self.flops}
        meta = np.array(json.dumps(self.metadata(), sort_keys=True))

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
                np.savez(f, meta=meta, **arrays)

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> OutcomeTable:
        """Read a table written by :meth:`save`; ValueError if the file is not one."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {name: z[name] for name in ARRAYS}
                flops = z["flops"]
        except FileNotFoundError:
            raise
        except Exception as e:  # zipfile / json / missing-key errors all mean "not a readable table"
            raise ValueError(f"{path} is not a readable outcome table: {e}") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not an outcome table of format {FORMAT} v{FORMAT_VERSION}")
        try:
            grid = SettingsGrid.from_json(meta["grid"], flops)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(
            **arrays,
            grid=grid,
            obs_flops=int(meta["obs_flops"]),
            backbone_sha256=meta["backbone_sha256"],
            split=meta["split"],
            observation=meta["observation"],
            data_sha256=meta.get("data_sha256", ""),
        )


def table_path(cache_dir: str | os.PathLike, sha256: str, split: str, observation: str, n: int) -> Path:
    """``<cache_dir>/<sha256[:16]>/<split>__<observation>__n<N>.npz``."""
    safe_split = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in split)
    return Path(cache_dir) / sha256[:16] / f"{safe_split}__{observation}__n{n}.npz"


def cache_path(
    model: AdaPerceiver,
    split: str,
    dataset: ImageDataset | FolderSplit,
    observation: str,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where the table of (backbone, split, observation, samples) is cached (:func:`table_path`)."""
    # an image-folder split's file name carries its fingerprint, so two data sets' tables never evict each other
    key = f"{split}@{dataset_sha256(dataset)[:12]}" if isinstance(dataset, FolderSplit) else split
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return table_path(root, backbone_identity(model), key, observation, len(dataset))


def load_cached(
    path: Path, model: AdaPerceiver, split: str, observation: str, dataset: ImageDataset | FolderSplit
) -> OutcomeTable | None:
    """The table at ``path`` if it is the one requested; None if missing, or stale (then one line on stderr)."""
    if not path.is_file():
        return None
    why: str | None
    try:
        table = OutcomeTable.load(path)
        why = table.mismatch(model, split, observation)
        if why is None and table.data_sha256 != dataset_sha256(dataset):
            why = "its samples differ from the requested dataset"
    except ValueError as e:
        why = str(e)
    if why is None:
        return table
    print(f"outcome table {path} is stale ({why}); rebuilding", file=sys.stderr)
    return None


def load_or_build(
    model: AdaPerceiver,
    split: str,
    data_dir: str | os.PathLike | None = None,
    observation: str = DEFAULT_OBSERVATION,
    cache_dir: str | os.PathLike | None = None,
    dataset: ImageDataset | FolderSplit | None = None,
    progress: bool = True,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    workers: int = 0,
    chunk_size: int = CHUNK_SIZE,
) -> OutcomeTable:
    """The cached table for (backbone, split, observation), building and caching it when missing or stale.

    A cached file is rebuilt (one line on stderr says why) when its backbone, split, observation, grid or samples
    differ from the request, or when it cannot be read.

    Args:
        model: The frozen backbone.
        split: A named split of :func:`backbone.data.load_split`, or the name of ``dataset``.
        data_dir: Fashion-MNIST folder for the named split.
        observation: Observation spec name.
        cache_dir: Root of the cache (default :func:`default_cache_dir`).
        dataset: Samples to use instead of loading ``split``: in memory, or an image-folder split
            (:class:`~backbone.folder_split.FolderSplit`, preprocessed for ``model``), which is streamed from disk and
            built in resumable chunks (:func:`envs.table_chunks.build_in_chunks`).
        progress: Show tqdm bars while building.
        batch_size: Images per forward pass while building.
        device: Torch device of the backbone while building (None: where it is); it is moved back afterwards.
        workers: DataLoader worker processes reading an image-folder split.
        chunk_size: Images per chunk of an image-folder split (its unit of resumption; the batches start at chunk
            starts, so the same chunk size gives the same table bit for bit).

    Returns:
        The table.
    """
    get_observation(observation)  # fail fast on a bad name
    if dataset is None:
        dataset = load_split(split, data_dir)
    path = cache_path(model, split, dataset, observation, cache_dir)
    table = load_cached(path, model, split, observation, dataset)
    if table is not None:
        return table
    if isinstance(dataset, FolderSplit):
        from envs.table_chunks import build_in_chunks  # imports this module

        device = device or next(model.parameters()).device
        return build_in_chunks(model, dataset, split, observation, path, batch_size=batch_size, device=device,
                               workers=workers, progress=progress, chunk_size=chunk_size)  # fmt: skip
    home = next(model.parameters()).device
    model.to(device or home)
    try:
        table = OutcomeTable.build(model, dataset, split, observation, batch_size=batch_size, progress=progress)
    finally:
        model.to(home)
    table.save(path)
    return table
