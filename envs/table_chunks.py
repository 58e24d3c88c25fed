"""Outcome tables of image-folder splits, built in chunks that are written atomically and resume after a stop.

A table over 50,000 ImageNet images and hundreds of settings takes long enough that an interruption must not lose
the work done. The split is cut into chunks of ``chunk_size`` images (in file order); each chunk's outcomes and
observations go to ``<table>.parts/chunk<i>.npz`` (atomic), next to a ``key.json`` naming the backbone, the data
fingerprint, the observation and the chunking. A rerun with the same key skips finished chunks; any other key
discards them. When every chunk is there the table is written (atomically) and the parts are removed. Images are
read by a ``DataLoader`` with workers (``FolderSplit.batches``) and run on ``device`` in batches of ``batch_size``.

Under ``torchrun`` rank ``r`` of ``N`` builds the chunks ``r, r + N, ...`` and rank 0 merges them once all are written,
so the parts folder must be on a filesystem every rank sees. The batches start at the same chunk starts either way,
so the table is the one a single process writes with the same ``chunk_size``, bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backbone.distributed import barrier, is_main, rank, world_size
from backbone.fileio import atomic_write
from backbone.folder_split import FolderSplit
from backbone.model import AdaPerceiver
from backbone.sweep import sweep
from envs.observations import get_observation, observe_embed
from envs.outcome_table import ARRAYS, CHUNK_SIZE, OutcomeTable, backbone_identity


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, **arrays)

    atomic_write(path, write)


@torch.no_grad()
def _run_chunk(
    model: AdaPerceiver, split: FolderSplit, spec, start: int, stop: int, batch_size: int, workers: int, bar: tqdm
) -> dict[str, np.ndarray]:
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    for images, labels, _ in split.batches(batch_size, workers, progress=False, start=start, stop=stop):
        x = images.to(device).float().div_(255.0)
        result = sweep(model, x, labels, batch_size=len(x))
        obs = spec.compute(model, observe_embed(model, x)).cpu().numpy()
        for name in ARRAYS:  # every per-setting array of the sweep, then the labels and observations
            parts[name].append({"labels": labels.numpy(), "obs": obs}.get(name, getattr(result, name, None)))
        bar.update(len(labels))
    return {name: np.concatenate(values) for name, values in parts.items()}


def build_in_chunks(
    model: AdaPerceiver,
    split: FolderSplit,
    name: str,
    observation: str,
    path: str | Path,
    batch_size: int = 256,
    chunk_size: int = CHUNK_SIZE,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
) -> OutcomeTable | None:
    """Build (or finish) the outcome table of ``split`` for ``model`` and save it at ``path``.

    Args:
        model: The frozen backbone (moved to ``device`` while building, then back).
        split: The split, preprocessed for ``model`` (:meth:`FolderSplit.preprocessed_for`).
        name: Split name recorded in the table (``policy-train``, ``test``, ...).
        observation: Observation spec name.
        path: Where the finished table goes; its chunks go to ``<path>.parts/``.
        batch_size: Images per forward pass.
        chunk_size: Images per chunk file (the unit of resumption).
        device: Torch device of the backbone while building.
        workers: DataLoader worker processes.
        progress: Show a progress bar (over images, counting finished chunks as done).

    Returns:
        The table (also saved at ``path``); None on ranks other than 0 of a torchrun job.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    spec = get_observation(observation)
    path = Path(path)
    parts = path.with_name(path.name + ".parts")
    key = {
        "backbone_sha256": backbone_identity(model),
        "data": split.fingerprint(),
        "observation": observation,
        "chunk_size": chunk_size,
        "n": len(split),
    }
    key_file = parts / "key.json"
    if is_main():
        if parts.is_dir() and (not key_file.is_file() or json.loads(key_file.read_text()) != key):
            shutil.rmtree(parts)  # chunks of another backbone, data or chunking: not reusable
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write(key_file, lambda tmp: Path(tmp).write_text(json.dumps(key, sort_keys=True)))
    barrier()  # stale chunks are gone before any rank looks for finished ones
    n = len(split)
    chunks = [(c * chunk_size, min(n, (c + 1) * chunk_size)) for c in range(math.ceil(n / chunk_size))]
    files = [parts / f"chunk{c:05d}.npz" for c in range(len(chunks))]
    mine = [(chunk, f) for c, (chunk, f) in enumerate(zip(chunks, files, strict=True)) if c % world_size() == rank()]
    total = sum(stop - start for (start, stop), _ in mine)
    done = sum(stop - start for (start, stop), f in mine if f.is_file())
    home = next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    try:
        bar = tqdm(total=total, initial=done, desc=f"outcome table {name}", unit="img",
                   disable=not progress or not is_main())  # fmt: skip
        with bar:
            for (start, stop), f in mine:
                if not f.is_file():
                    _save_npz(f, _run_chunk(model, split, spec, start, stop, batch_size, workers, bar))
    finally:
        model.to(home).train(was_training)
    barrier()  # every rank's chunks are on disk
    if not is_main():
        return None
    arrays: dict[str, list[np.ndarray]] = {a: [] for a in ARRAYS}
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            for a in ARRAYS:
                arrays[a].append(z[a])
    merged = {a: np.concatenate(v) for a, v in arrays.items()}
    if not np.array_equal(merged["labels"], split.labels.numpy()):
        raise ValueError(f"{parts}: the chunks do not hold the labels of {split.name}; delete the folder and rebuild")
    table = OutcomeTable(
        **merged,
        grid=model.grid,
        obs_flops=int(spec.flops(model)),
        backbone_sha256=key["backbone_sha256"],
        split=name,
        observation=observation,
        data_sha256=key["data"],
    )
    table.save(path)
    shutil.rmtree(parts)
    return table
