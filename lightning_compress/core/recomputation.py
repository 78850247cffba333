"""Whether a forward pass is activation checkpointing's recomputation inside the backward pass."""

from __future__ import annotations

import torch

__all__ = ["recomputing"]


def recomputing() -> bool:
    """True while autograd runs a backward pass, where a forward is a checkpointed layer's
    recomputation (its activations were not kept).

    Observers that fold each training batch into running statistics skip such a forward: it
    sees the batch a second time, and the recomputed activations must use the qparams the
    original forward used.

    Returns:
        Whether the caller runs inside a backward pass.
    """
    return torch._C._current_graph_task_id() != -1
