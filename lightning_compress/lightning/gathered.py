"""The full (unsharded) model on one rank, for saving a model trained under FSDP2.

``ModelParallelStrategy`` (FSDP2's ``fully_shard``) leaves each rank a shard of every weight,
as a ``DTensor``. Saving a checkpoint needs the whole model on one process: every rank
takes part in gathering each sharded tensor (a collective), and the rank that saves swaps
the full tensors, on the CPU, into the model for as long as it writes, then puts the
shards back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["full_model"]


@contextmanager
def full_model(model: nn.Module, keep: bool) -> Iterator[bool]:
    """Gather ``model``'s sharded parameters and buffers; on the rank that keeps them, swap
    them in.

    Every rank must enter it (the gathers are collectives, one per sharded tensor, in the
    model's order). While inside, on the keeping rank, every parameter and buffer of
    ``model`` is a plain CPU tensor holding its full value (tied tensors stay tied); the
    other ranks hold nothing more than before. On leaving, even after an error, the model's
    own tensors (shards included) are back in place. A model with no sharded tensor is
    left as it is on every rank.

    Args:
        model: the model (after training; it is not run while inside).
        keep: whether this rank keeps the full tensors (rank 0, which saves).

    Yields:
        Whether the model was sharded (its tensors were swapped on the keeping rank).
    """
    slots = list(_slots(model))
    if not any(isinstance(tensor, DTensor) for *_, tensor in slots):
        yield False
        return
    swapped: dict[int, Tensor] = {}  # by the id of the model's tensor: tied ones stay tied
    seen: set[int] = set()  # every rank gathers each tensor once, in the same order
    with torch.no_grad():
        for module, table, _, tensor in slots:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if keep:
                value = value.detach().cpu()
                if table is module._parameters:
                    value = nn.Parameter(value, requires_grad=False)
                swapped[id(tensor)] = value
    if not keep:
        yield True
        return
    try:
        for _, table, name, tensor in slots:
            table[name] = swapped[id(tensor)]
        yield True
    finally:
        for _, table, name, tensor in slots:
            table[name] = tensor


def _slots(model: nn.Module) -> Iterator[tuple[nn.Module, dict, str, Tensor]]:
    """``(module, its parameter or buffer table, name, tensor)`` of every tensor, in order."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    yield module, table, name, tensor
