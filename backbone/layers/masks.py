"""Block-causal attention mask over nested token granularities.

A latent with index in ``[g_{j-1}, g_j)`` may attend to every key with index ``< g_j`` (DESIGN §2). So the
first ``g`` latents never depend on later ones and one pass with ``N_max`` latents yields every granularity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_causal_mask(token_granularities: Sequence[int]) -> torch.Tensor:
    """Boolean ``(N_max, N_max)`` mask, True where query ``i`` may attend to key ``j``."""
    n_max = token_granularities[-1]
    group_end = torch.empty(n_max, dtype=torch.long)
    start = 0
    for g in token_granularities:
        group_end[start:g] = g
        start = g
    keys = torch.arange(n_max)
    return keys[None, :] < group_end[:, None]
