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
from typing import Any

from compressed_tensors.config import SparsityStructure
from torch import nn

from lightning_compress.modifiers.pruning.structure import (
    SPARSITY_THRESHOLD,
    follows_2_4,
    zero_count,
)

__all__ = ["SPARSITY_NAME", "SPARSITY_THRESHOLD", "follows_2_4", "sparsity_record", "write_record"]

SPARSITY_NAME = "sparsity.json"
"""The file, beside ``config.json`` and ``recipe.yaml``, that records the sparsity."""


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
        None when no linear layer is pruned, else ``global_sparsity`` (the fraction of zeros
        over all linear weights), ``sparsity_structure`` (``2:4`` when every pruned layer
        follows it, else ``unstructured``) and ``layers``: each pruned layer's name (as in
        the model in memory) to its ``sparsity`` and ``sparsity_structure``.
    """
    linears = {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    counted = {} if zeros is None else zeros
    zeros = {
        name: counted[name] if name in counted else zero_count(weight)
        for name, weight in linears.items()
    }
    layers = {
        name: {
            "sparsity": zeros[name] / weight.numel(),
            "sparsity_structure": _structure(follows_2_4(weight)),
        }
        for name, weight in linears.items()
        if zeros[name] >= SPARSITY_THRESHOLD * weight.numel()
    }
    if not layers:
        return None
    two_four = _structure(True)
    total = sum(weight.numel() for weight in linears.values())
    return {
        "global_sparsity": sum(zeros.values()) / total,
        "sparsity_structure": _structure(
            all(layer["sparsity_structure"] == two_four for layer in layers.values())
        ),
        "layers": layers,
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
