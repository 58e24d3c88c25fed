"""Outcome tables built by the processes of a ``torchrun`` job, each over its shard; rank 0 merges and caches them.

The table lands in the file, format and cache key the single-process :func:`envs.outcome_table.load_or_build` writes.
Each shard starts at a batch boundary of the single-process build (an in-memory split is cut into whole batches, an
image-folder split into whole chunks: ``envs/table_chunks.py``), so every forward pass sees the batch it would see in
one process and the merged table equals the single-process one exactly.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from backbone.data import ImageDataset
from backbone.distributed import broadcast, gather_to_main, is_main, rank, world_size
from backbone.folder_split import FolderSplit
from backbone.model import AdaPerceiver
from envs.observations import get_observation
from envs.outcome_table import (
    ARRAYS,
    CHUNK_SIZE,
    OutcomeTable,
    backbone_identity,
    cache_path,
    dataset_sha256,
    load_cached,
    load_or_build,
)


def load_or_build_sharded(
    model: AdaPerceiver,
    split: str,
    dataset: ImageDataset | FolderSplit,
    observation: str,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    workers: int = 0,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
) -> OutcomeTable | None:
    """:func:`~envs.outcome_table.load_or_build` with the work split over the ranks; the table on rank 0, else None.

    Rank 0 decides whether the cached table is still good and tells the others. An image-folder split's chunks go to
    a folder next to the table that every rank must see (a shared filesystem); an in-memory split's shards come back
    to rank 0 through the process group, so its ranks may be on machines that share nothing.
    """
    if world_size() == 1:
        return load_or_build(model, split, observation=observation, cache_dir=cache_dir, dataset=dataset,
                             progress=progress, batch_size=batch_size, device=device, workers=workers,
                             chunk_size=chunk_size)  # fmt: skip
    path = cache_path(model, split, dataset, observation, cache_dir)
    cached = load_cached(path, model, split, observation, dataset) if is_main() else None
    if broadcast(cached is not None):
        return cached
    if isinstance(dataset, FolderSplit):
        from envs.table_chunks import build_in_chunks

        return build_in_chunks(model, dataset, split, observation, path, batch_size=batch_size, chunk_size=chunk_size,
                               device=device, workers=workers, progress=progress)  # fmt: skip
    home = next(model.parameters()).device
    model.to(device)
    try:
        start, stop = _batch_aligned_shard(len(dataset), batch_size)
        part = None
        if stop > start:  # more ranks than batches leaves some ranks without work
            shard = ImageDataset(dataset.images[start:stop], dataset.labels[start:stop], dataset.classes, dataset.name)
            table = OutcomeTable.build(model, shard, split, observation, batch_size, progress=progress and is_main())
            part = {name: getattr(table, name) for name in ARRAYS}
    finally:
        model.to(home)
    parts = gather_to_main(part)
    if parts is None:
        return None
    merged = {name: np.concatenate([p[name] for p in parts if p is not None]) for name in ARRAYS}
    table = OutcomeTable(**merged, grid=model.grid, obs_flops=int(get_observation(observation).flops(model)),
                         backbone_sha256=backbone_identity(model), split=split, observation=observation,
                         data_sha256=dataset_sha256(dataset))  # fmt: skip
    table.save(path)
    return table


def _batch_aligned_shard(n: int, batch_size: int) -> tuple[int, int]:
    """This rank's rows ``[start, stop)``: a contiguous run of whole batches (ranks in order cover ``[0, n)``)."""
    batches, r, world = math.ceil(n / batch_size), rank(), world_size()
    return min(n, batches * r // world * batch_size), min(n, batches * (r + 1) // world * batch_size)
