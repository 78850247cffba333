"""Helpers for logging model information during compression."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_compress.core.logger import LoggerManager
from lightning_compress.core.shard_counts import zero_count
from lightning_compress.core.state import State

__all__ = ["log_model_info", "model_sparsity", "should_log_model_info"]

# Layer kinds whose weight sparsity is reported.
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def should_log_model_info(
    model: Any,
    loggers: LoggerManager | None,
    current_log_step: float,
    last_log_step: float | None = None,
    cadence: float | None = None,
) -> bool:
    """Whether model information is due.

    Args:
        model: the model; nothing is logged without one.
        loggers: the session's loggers.
        current_log_step: the current schedule index.
        last_log_step: the index of the last model log.
        cadence: the session's ``model_log_cadence``; overrides the loggers' frequency.

    Returns:
        True when model information should be logged now.
    """
    return (
        model is not None
        and loggers is not None
        and loggers.log_ready(current_log_step, last_log_step, cadence)
    )


def model_sparsity(model: nn.Module) -> dict[str, float]:
    """The fraction of exact zeros in each weight layer's weight, and overall.

    Weights sharded as ``DTensor`` (FSDP2) count whole: a collective then, which every rank
    must call (log the result on rank zero only).

    Args:
        model: the model.

    Returns:
        ``{layer_name: sparsity}`` plus ``"__all__"`` for all those weights together.
    """
    result = {}
    zeros = total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, _WEIGHT_LAYERS) or not isinstance(weight, torch.Tensor):
            continue
        layer_zeros = zero_count(weight)
        result[name] = layer_zeros / weight.numel()
        zeros += layer_zeros
        total += weight.numel()
    result["__all__"] = zeros / total if total else 0.0
    return result


def log_model_info(state: State, current_log_step: float) -> None:
    """Log each weight layer's sparsity and the optimizer's learning rates.

    Under FSDP2 every rank must call it (the sparsity is counted over all shards); the
    loggers write on rank zero.

    Args:
        state: the session's state (its ``model``, ``optimizer`` and ``loggers``).
        current_log_step: the schedule index to log at.
    """
    if state.loggers is None or state.model is None:
        return
    state.loggers.log_scalars("ParamPruning", model_sparsity(state.model), current_log_step)
    optimizer = state.optimizer
    if optimizer is not None and hasattr(optimizer, "param_groups"):
        rates = {str(i): group["lr"] for i, group in enumerate(optimizer.param_groups)}
        state.loggers.log_scalars("LearningRate", rates, current_log_step)
