"""Running a model on a calibration batch, and capturing what its first block receives."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_compress.core.tensors import map_tensors

__all__ = [
    "BlockInputs",
    "call_model",
    "capture_block_inputs",
    "input_device",
]


@dataclass(frozen=True)
class BlockInputs:
    """The positional and keyword arguments one calibration batch passes to a block.

    The hidden states are the first positional argument (or the ``hidden_states`` keyword);
    everything else (attention mask, position ids, ``(cos, sin)`` position embeddings,
    ``cache_position``) is the same for every block and is replayed unchanged.

    Args:
        args: positional arguments.
        kwargs: keyword arguments.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden_states(self) -> torch.Tensor:
        """The hidden states the block transforms."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden_states: torch.Tensor | None) -> BlockInputs:
        """The same inputs with other hidden states.

        Args:
            hidden_states: the new hidden states (None leaves a hole, for storage).

        Returns:
            New inputs.
        """
        if self.args:
            return replace(self, args=(hidden_states, *self.args[1:]))
        return replace(self, kwargs={**self.kwargs, "hidden_states": hidden_states})

    def to(self, device: torch.device | str) -> BlockInputs:
        """The same inputs with every tensor on ``device``.

        Args:
            device: the target device.

        Returns:
            New inputs (tensors already there are not copied).
        """
        args, kwargs = map_tensors((self.args, self.kwargs), lambda tensor: tensor.to(device))
        return BlockInputs(args, kwargs)


def input_device(model: nn.Module) -> torch.device:
    """The device the model's inputs must be on: that of its input embeddings.

    Args:
        model: the model.

    Returns:
        The device of the input embeddings, else of the first parameter, else the CPU.
    """
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    for module in (embeddings, model):
        parameter = next(module.parameters(), None) if module is not None else None
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch with its key/value cache turned off.

    Args:
        model: the model.
        batch: a mapping of keyword arguments (``input_ids``, ``attention_mask``), a tuple of
            positional arguments, or a single tensor; moved to the model's input device.

    Returns:
        What the model returned.
    """
    batch = map_tensors(batch, lambda tensor: tensor.to(input_device(model)))
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


class _StopForward(Exception):
    """Raised by the capture hook to stop the model right before its first block."""


def capture_block_inputs(model: nn.Module, block: nn.Module, batch: Any) -> BlockInputs:
    """Run the model up to ``block`` and return the arguments the block would receive.

    A forward pre-hook on ``block`` records its positional and keyword arguments and stops
    the forward, so only what precedes the block (the embeddings) runs. Caches are dropped.

    Args:
        model: the model.
        block: the first block.
        batch: the batch (see ``call_model``).

    Returns:
        The block's inputs, on the device where the model produced them.

    Raises:
        RuntimeError: if the forward finishes without calling ``block``.
    """
    captured: list[BlockInputs] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(BlockInputs(_without_cache(args), _without_cache(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    try:
        call_model(model, batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"the forward of {type(model).__name__} never called its first block "
            f"({type(block).__name__}); pass sequential_targets naming the blocks it runs, "
            f"or use pipeline='basic'"
        )
    return captured[0]


def _without_cache(value: Any) -> Any:
    """Replace key/value cache objects by None and ``use_cache`` by False."""
    if isinstance(value, dict):
        return {
            key: False if key == "use_cache" else _without_cache(item)
            for key, item in value.items()
        }
    if isinstance(value, tuple):
        return tuple(_without_cache(item) for item in value)
    return None if hasattr(value, "get_seq_length") else value


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
