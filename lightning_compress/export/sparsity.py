"""The ``sparsity_config`` entry: which linear layers are pruned, and how."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compressed_tensors.config import CompressionFormat, DenseSparsityConfig, SparsityStructure
from torch import nn

from lightning_compress.export.quantization_config import LINEAR_TARGET, unmatched_linears
from lightning_compress.modifiers.pruning.structure import (
    SPARSITY_THRESHOLD,
    follows_2_4,
    zero_count,
)

__all__ = ["SPARSITY_THRESHOLD", "follows_2_4", "sparsity_config"]


def sparsity_config(
    model: nn.Module, zeros: Mapping[str, int] | None = None
) -> dict[str, Any] | None:
    """Describes the pruned linear layers of ``model``, read from their zero weights.

    Pruning modifiers leave their zeros in the weights and nothing else, so sparsity is
    measured: layers with at least :data:`SPARSITY_THRESHOLD` zeros are the targets, and the
    structure is ``2:4`` when every one of them keeps at most 2 of each 4 consecutive input
    weights; ``global_sparsity`` is the fraction of zeros over all linear weights. The weights
    are stored dense (format ``dense``), which every compressed-tensors reader loads,
    quantized or not.

    Args:
        model: the model.
        zeros: zero weights already counted, by layer name (e.g. on the int8 codes of
            quantized layers, a quarter of the work); the other layers are counted here.

    Returns:
        The ``sparsity_config`` mapping, or None when no linear layer is pruned.
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
    sparse = [
        name
        for name, weight in linears.items()
        if zeros[name] >= SPARSITY_THRESHOLD * weight.numel()
    ]
    if not sparse:
        return None
    structure = (
        SparsityStructure.TWO_FOUR
        if all(follows_2_4(linears[name]) for name in sparse)
        else SparsityStructure.UNSTRUCTURED
    )
    total = sum(weight.numel() for weight in linears.values())
    config = DenseSparsityConfig(
        format=CompressionFormat.dense.value,
        targets=[LINEAR_TARGET],
        ignore=unmatched_linears(model, set(sparse)),
        global_sparsity=sum(zeros.values()) / total,
        sparsity_structure=structure.value,
    )
    return config.model_dump()
