"""What counts as a pruned weight, read from its zeros."""

from __future__ import annotations

import torch

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


SIGNLESS_BITS = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}
"""Per float width: the int dtype of that width and the mask that drops the sign bit."""


def zero_count(weight: torch.Tensor) -> int:
    """The number of zeros (of either sign) in ``weight``.

    Contiguous 16- and 32-bit floats are counted on their bits without the sign, about twice
    as fast as ``count_nonzero`` on bfloat16 or float32 values.

    Args:
        weight: a tensor.

    Returns:
        How many of its elements equal 0.
    """
    weight = weight.detach()
    bits = SIGNLESS_BITS.get(weight.element_size())
    if weight.is_floating_point() and bits is not None and weight.is_contiguous():
        int_dtype, mask = bits
        weight = weight.view(int_dtype) & mask
    return weight.numel() - int(torch.count_nonzero(weight))


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
