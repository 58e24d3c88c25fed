"""Joint training on several processes that gives the result of one process with the same global batch and seed.

Every rank draws the global batch exactly as one process would (the epoch's permutation, then per step the
augmentation, one FFN width and one shallow input stage per sample, all seeded from (seed, step)) and keeps its
interleaved shard ``global[rank::world]``: the shard ``torch.utils.data.DistributedSampler`` gives of the same
permutation, so each rank sees 1/world of every epoch, and every sample keeps the draws it would get on one process.
Each rank's loss is the mean over its shard; DistributedDataParallel averages the gradients over the ranks, which is
the gradient of the mean over the global batch. The model has no batch statistics (LayerNorm only), so the shard
forward equals the global one row by row. What differs: the order of floating-point sums (fp32 rounding), and
stochastic depth (``drop_path_rate > 0``), whose masks each rank draws for its own shard.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backbone.distributed import rank, world_size
from backbone.model import AdaPerceiver


class JointForward(nn.Module):
    """One training step's forward as a module's ``forward``: DistributedDataParallel synchronises gradients of
    what runs inside its wrapped module's ``forward``, and a step runs ``forward_all`` up to twice (sandwich rule)."""

    def __init__(self, model: AdaPerceiver) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, widths: torch.Tensor, stages: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write-outs ``(B, K, L, C)`` at the deepest input stage and, with ``stages``, at each sample's shallow one."""
        deep = self.model.forward_all(x, width=widths)
        if stages is None:
            return deep, None
        return deep, self.model.forward_all(self.model.embed_per_sample(x, stages), width=widths)


def wrap_for_ranks(model: AdaPerceiver) -> nn.Module:
    """``JointForward(model)``, inside DistributedDataParallel when there are several ranks.

    ``find_unused_parameters``: a shard may hold no sample of some shallow input stage, so that exit's parameters
    get no gradient on that rank in that step.
    """
    net = JointForward(model)
    if world_size() == 1:
        return net
    device = next(model.parameters()).device
    return DistributedDataParallel(
        net, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
    )


def per_process_batch(global_batch: int) -> int:
    """Images per rank and step; ValueError unless the global batch splits evenly (equal shards keep the mean of the
    ranks' means equal to the global mean)."""
    world = world_size()
    if global_batch % world:
        raise ValueError(f"batch_size={global_batch} (the global batch) is not divisible by the {world} processes")
    return global_batch // world


def my_shard(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's interleaved rows ``t[rank::world]`` of a global-batch tensor (``t`` itself for one process)."""
    world = world_size()
    return t if t is None or world == 1 else t[rank() :: world]
