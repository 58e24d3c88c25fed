"""torch.distributed for the commands that scale out with ``torchrun``: one process group, set up from its env vars.

``torchrun --nproc_per_node N -m backbone.train ...`` (or ``-m envs.build_tables``) starts N copies of the command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous in the environment. :func:`process_group` reads them
and opens the group (gloo for CPU tensors, NCCL for CUDA ones); without them, or with ``WORLD_SIZE=1``, it opens
nothing and every helper here answers as for one process, so the single-process path stays exactly as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# collectives wait this long for the slowest rank (a rank building its share of a large table can lag by many minutes;
# the default of 30 minutes would then kill a healthy job)
TIMEOUT = datetime.timedelta(hours=2)


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when started without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> torch.device:
    """``device``, with ``cuda`` meaning this process's own GPU (``cuda:LOCAL_RANK``) so ranks never share one;
    ValueError in one line for a name torch does not know or a CUDA device on a machine without one."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA GPU that torch can use")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[None]:
    """Open the process group torchrun describes (no-op for one process) and close it again on the way out.

    NCCL only moves CUDA tensors and gloo CPU ones, so the backend follows the device the work runs on.
    """
    if launched_world_size() == 1 or dist.is_initialized():
        yield
        return
    dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes logs, checkpoints and tables and prints results."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for one process): e.g. before reading files another rank wrote."""
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; ``obj`` itself for one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere); ``[obj]`` for one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (detached) tensor over ranks, e.g. the global batch's loss from each shard's loss."""
    if world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


def _collective_device() -> torch.device:
    """Object collectives stage their bytes on the current GPU under NCCL and on the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
