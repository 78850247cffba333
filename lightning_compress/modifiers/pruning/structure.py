"""What counts as a pruned weight, read from its zeros."""

from __future__ import annotations

import torch

__all__ = ["SPARSITY_THRESHOLD", "follows_2_4", "is_pruned"]

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
    return weight.numel() - int(torch.count_nonzero(weight)) >= SPARSITY_THRESHOLD * weight.numel()


def follows_2_4(weight: torch.Tensor) -> bool:
    """Whether every run of 4 consecutive input weights of each row holds at least 2 zeros.

    Args:
        weight: a ``[out_features, in_features]`` weight.

    Returns:
        True for a 2:4-sparse weight (``in_features`` must be a multiple of 4).
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    zeros_per_group = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(dim=-1)
    return bool((zeros_per_group >= 2).all())
