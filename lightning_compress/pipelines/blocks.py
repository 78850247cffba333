"""Finding the repeated blocks (decoder layers) that the sequential pipeline walks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Block", "find_blocks", "hidden_states_of"]

Block = tuple[str, nn.Module]


def find_blocks(model: nn.Module, sequential_targets: Sequence[str] | None = None) -> list[Block]:
    """The model's repeated blocks, in the order the forward runs them.

    Without ``sequential_targets`` these are the children of the longest ``nn.ModuleList``
    (at least two) whose children all share one class: the decoder layers of a language model
    (``model.layers``, ``transformer.h``, ``model.decoder.layers``). The pipeline assumes each
    block consumes the previous block's output, as decoder layers do.

    Args:
        model: the model.
        sequential_targets: class names of the blocks, overriding the search
            (e.g. ``["LlamaDecoderLayer"]``); they are taken in module order.

    Returns:
        ``(name, module)`` pairs; empty when the model has no repeated blocks.

    Raises:
        ValueError: if ``sequential_targets`` matches no module, or matches blocks nested in
            one another.
    """
    if sequential_targets:
        return _blocks_by_class(model, list(sequential_targets))
    best: list[Block] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len(module) <= len(best):
            continue
        if len({type(child) for child in module}) == 1:
            prefix = f"{name}." if name else ""
            best = [(f"{prefix}{index}", child) for index, child in enumerate(module)]
    return best


def _blocks_by_class(model: nn.Module, class_names: list[str]) -> list[Block]:
    blocks = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ in class_names
    ]
    if not blocks:
        present = sorted({type(module).__name__ for module in model.modules()})
        raise ValueError(
            f"sequential_targets {class_names} match no module of {type(model).__name__}; "
            f"expected class names among {present}"
        )
    names = [name for name, _ in blocks]
    nested = [inner for inner in names for outer in names if inner.startswith(f"{outer}.")]
    if nested:
        raise ValueError(
            f"sequential_targets {class_names} select blocks nested in other blocks "
            f"({nested}); expected classes whose modules do not contain one another"
        )
    return blocks


def hidden_states_of(output: object) -> torch.Tensor:
    """The hidden states a block returned.

    Hugging Face decoder layers return a tensor or a tuple whose first element is the hidden
    states, depending on the transformers version.

    Args:
        output: what the block's forward returned.

    Returns:
        The hidden states.

    Raises:
        TypeError: for any other output.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"a block returned {type(output).__name__}; expected a tensor of hidden states or a "
        f"tuple whose first element is one"
    )
