"""Counts over weights that may be sharded as ``DTensor`` (FSDP2, tensor parallelism).

A report about a weight (its zeros, whether it follows a pattern) must describe the whole
weight, the same on every rank. For a ``DTensor`` each rank counts on its own shard and the
counts are summed over the ranks that hold other shards (copies on replicated mesh dimensions
are counted once). Where a shard cannot be counted on its own — a ``Partial`` placement (the
local values are not the weight's), or a check that needs whole rows on a weight sharded along
another dimension — the whole weight is gathered on every rank and counted there.

For a ``DTensor`` these are collectives: every rank of its mesh must call them, in the same
order. Compute the counts on all ranks and only log them on rank zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate

__all__ = ["count_over_shards", "zero_count"]

SIGNLESS_BITS = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}
"""Per float width: the int dtype of that width and the mask that drops the sign bit."""


def count_over_shards(
    tensor: torch.Tensor, count: Callable[[torch.Tensor], int], whole_rows: bool = False
) -> int:
    """``count`` of the whole ``tensor``, taken shard by shard for a ``DTensor``.

    Args:
        tensor: a plain tensor or a ``DTensor``.
        count: counts something in a plain tensor; it must add up over parts of the tensor
            (zeros, rows or groups of a row that break a pattern) so that the counts of the
            shards sum to the count of the whole.
        whole_rows: ``count`` reads whole rows (dimension 1 and up of a slice along dimension
            0): it runs on the shards only when the tensor is sharded along dimension 0 alone,
            else on the gathered tensor.

    Returns:
        ``count`` of the whole tensor, the same on every rank.
    """
    if not isinstance(tensor, DTensor):
        return count(tensor)
    placements = tensor.placements
    if not all(_countable(placement, whole_rows) for placement in placements):
        return count(tensor.full_tensor())
    local = tensor.to_local()
    total = torch.tensor(count(local), dtype=torch.int64, device=local.device)
    summed = [Partial("sum") if item.is_shard() else Replicate() for item in placements]
    return int(DTensor.from_local(total, tensor.device_mesh, summed, run_check=False).full_tensor())


def zero_count(tensor: torch.Tensor) -> int:
    """The number of zeros (of either sign) in ``tensor``, over all its shards.

    Contiguous 16- and 32-bit floats are counted on their bits without the sign, about twice
    as fast as ``count_nonzero`` on bfloat16 or float32 values.

    Args:
        tensor: a plain tensor or a ``DTensor`` (a collective then: every rank calls it).

    Returns:
        How many of its elements equal 0.
    """
    return count_over_shards(tensor.detach(), _local_zero_count)


def _local_zero_count(tensor: torch.Tensor) -> int:
    bits = SIGNLESS_BITS.get(tensor.element_size())
    if tensor.is_floating_point() and bits is not None and tensor.is_contiguous():
        int_dtype, mask = bits
        tensor = tensor.view(int_dtype) & mask
    return tensor.numel() - int(torch.count_nonzero(tensor))


def _countable(placement: Placement, whole_rows: bool) -> bool:
    """Whether a shard of this placement can be counted on its own."""
    if placement.is_replicate():
        return True
    return placement.is_shard(0) or (placement.is_shard() and not whole_rows)
