"""What counts as a pruned weight, read from its zeros.

Weights sharded as ``DTensor`` (FSDP2) are judged whole: the counts are taken on each rank's
shard and summed over the ranks (``core.shard_counts``), so these are collectives for a
``DTensor`` and every rank must call them.
"""

from __future__ import annotations

import torch

from lightning_compress.core.shard_counts import count_over_shards, zero_count

__all__ = ["SPARSITY_THRESHOLD", "follows_2_4", "is_pruned", "zero_count"]

SPARSITY_THRESHOLD = 0.5
"""A linear layer counts as pruned when at least this fraction of its weights is zero.

Rounding to 4 bits alone zeroes far fewer weights, so quantized layers are not mistaken for
pruned ones."""


def is_pruned(weight: torch.Tensor) -> bool:
    """Whether at least :data:`SPARSITY_THRESHOLD` of ``weight`` is zero.

    Args:
        weight: a layer's weight.

    Returns:
        True for a pruned weight.
    """
    return zero_count(weight) >= SPARSITY_THRESHOLD * weight.numel()


def follows_2_4(weight: torch.Tensor) -> bool:
    """Whether every run of 4 consecutive input weights of each row holds at least 2 zeros.

    A ``DTensor`` sharded by rows (``Shard(0)``, as FSDP2 shards) is checked on each rank's
    whole rows; one sharded along its inputs is gathered first, since a run of 4 may straddle
    two shards.

    Args:
        weight: a ``[out_features, in_features]`` weight.

    Returns:
        True for a 2:4-sparse weight (``in_features`` must be a multiple of 4).
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return count_over_shards(weight.detach(), _runs_short_of_2_zeros, whole_rows=True) == 0


def _runs_short_of_2_zeros(weight: torch.Tensor) -> int:
    rows, inputs = weight.shape  # a shard may hold no rows
    zeros_per_run = (weight.reshape(rows, inputs // 4, 4) == 0).sum(dim=-1)
    return int((zeros_per_run < 2).sum())
