"""The sparsity record of a checkpoint (``sparsity.json``): which linear layers are pruned, how.

The checkpoint's ``quantization_config`` carries no sparsity: its ``sparsity_config`` is
empty, as compressed-tensors 0.20 writes it. vLLM picks its 2:4 scheme, which now only raises
``NotImplementedError``, for the unquantized and W8A8 layers a ``2:4`` ``sparsity_config``
targets; an unstructured one changes nothing it runs. The weights are stored dense either
way, so what the pruning reached is kept beside them, in this record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from compressed_tensors.config import SparsityStructure
from torch import Tensor, nn

from lightning_compress.modifiers.pruning.structure import (
    SPARSITY_THRESHOLD,
    follows_2_4,
    zero_count,
)

__all__ = [
    "SPARSITY_NAME",
    "SPARSITY_THRESHOLD",
    "LayerSparsity",
    "follows_2_4",
    "layer_sparsity",
    "sparsity_record",
    "summarize_sparsity",
    "write_record",
]

SPARSITY_NAME = "sparsity.json"
"""The file, beside ``config.json`` and ``recipe.yaml``, that records the sparsity."""


class LayerSparsity(NamedTuple):
    """What one linear layer's weight holds, for the sparsity record.

    Attributes:
        numel: its number of weights.
        zeros: how many of them are zero.
        two_four: whether it follows ``2:4`` (None when it is not pruned: fewer than
            :data:`SPARSITY_THRESHOLD` zeros, so it was not checked).
    """

    numel: int
    zeros: int
    two_four: bool | None


def layer_sparsity(weight: Tensor, zeros: int | None = None) -> LayerSparsity:
    """Measures one linear layer's weight for :func:`summarize_sparsity`.

    Args:
        weight: the layer's weight.
        zeros: its zero weights, when already counted (e.g. on its int8 codes).

    Returns:
        Its size, zeros, and whether a pruned weight follows ``2:4``.
    """
    numel = weight.numel()
    zeros = zero_count(weight) if zeros is None else zeros
    pruned = zeros >= SPARSITY_THRESHOLD * numel
    return LayerSparsity(numel, zeros, follows_2_4(weight) if pruned else None)


def sparsity_record(
    model: nn.Module, zeros: Mapping[str, int] | None = None
) -> dict[str, Any] | None:
    """Describes the pruned linear layers of ``model``, read from their zero weights.

    Pruning modifiers leave their zeros in the weights and nothing else, so sparsity is
    measured: layers with at least :data:`SPARSITY_THRESHOLD` zeros are pruned, each ``2:4``
    when it keeps at most 2 of each 4 consecutive input weights, else ``unstructured``.

    Args:
        model: the model.
        zeros: zero weights already counted, by layer name (e.g. on the int8 codes of
            quantized layers, a quarter of the work); the other layers are counted here.

    Returns:
        As :func:`summarize_sparsity`.
    """
    counted = {} if zeros is None else zeros
    return summarize_sparsity(
        {
            name: layer_sparsity(module.weight.detach(), counted.get(name))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        }
    )


def summarize_sparsity(layers: Mapping[str, LayerSparsity]) -> dict[str, Any] | None:
    """The sparsity record of a model's linear layers, from each one's measure.

    Args:
        layers: every linear layer's name (as in the model in memory) to its
            :func:`layer_sparsity`, in module order.

    Returns:
        None when no linear layer is pruned, else ``global_sparsity`` (the fraction of zeros
        over all linear weights), ``sparsity_structure`` (``2:4`` when every pruned layer
        follows it, else ``unstructured``) and ``layers``: each pruned layer's name to its
        ``sparsity`` and ``sparsity_structure``.
    """
    pruned = {
        name: {
            "sparsity": layer.zeros / layer.numel,
            "sparsity_structure": _structure(layer.two_four),
        }
        for name, layer in layers.items()
        if layer.two_four is not None
    }
    if not pruned:
        return None
    two_four = _structure(True)
    total = sum(layer.numel for layer in layers.values())
    return {
        "global_sparsity": sum(layer.zeros for layer in layers.values()) / total,
        "sparsity_structure": _structure(
            all(layer["sparsity_structure"] == two_four for layer in pruned.values())
        ),
        "layers": pruned,
    }


def write_record(record: dict[str, Any], directory: Path) -> None:
    """Writes a :func:`sparsity_record` to :data:`SPARSITY_NAME` in ``directory``.

    Args:
        record: the record.
        directory: the checkpoint directory being written.
    """
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    (directory / SPARSITY_NAME).write_text(text)


def _structure(two_four: bool) -> str:
    return (SparsityStructure.TWO_FOUR if two_four else SparsityStructure.UNSTRUCTURED).value
