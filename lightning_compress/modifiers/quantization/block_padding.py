"""FP8 blocks on layers they do not tile: padded as compressed-tensors pads them, and said so.

compressed-tensors 0.20 pads a weight whose dimensions its ``block_structure`` does not divide
with zeros to whole blocks (``maybe_pad_tensor_for_block_quant``; the scales are
``ceil(rows / block_rows) x ceil(columns / block_columns)``, and it warns when the columns do
not divide) and stores the weight unpadded; this project quantizes such layers the same way
(:func:`~lightning_compress.modifiers.quantization.ops.strategy_groups`). vLLM creates block
scales of that ceil-divided shape and loads such layers, but ``validate_fp8_block_shape``
(``vllm/model_executor/layers/quantization/utils/fp8_utils.py``) refuses, under tensor
parallelism, partitions the blocks do not divide, and always a layer fused with a later sibling
(``q_proj``/``k_proj`` of q/k/v, ``gate_proj`` of gate/up) whose output features are not whole
blocks.
"""

from __future__ import annotations

from loguru import logger

from lightning_compress.modifiers.quantization.fused import FUSED_SIBLINGS

__all__ = ["warn_about_padded_blocks"]


def warn_about_padded_blocks(
    owner: str, layers: dict[str, tuple[tuple[int, int], tuple[int, int]]]
) -> list[str]:
    """Warns, naming them, about the layers whose weights their blocks do not tile.

    Args:
        owner: who quantizes them, for the message (e.g. ``"QuantizationModifier"``).
        layers: layer name to ``((out_features, in_features), block_structure)`` of each
            layer quantized in blocks.

    Returns:
        The names of the padded layers (empty when every block tiles its layer).
    """
    padded = {
        name: (shape, block)
        for name, (shape, block) in layers.items()
        if shape[0] % block[0] or shape[1] % block[1]
    }
    if not padded:
        return []
    blocks = sorted({tuple(block) for _, block in padded.values()})
    refused = [
        name
        for name, (shape, block) in padded.items()
        if shape[0] % block[0] and _fused_first(name)
    ]
    logger.warning(
        "{}: block_structure {} does not tile the weights of {}; they are padded with zeros to "
        "whole blocks, as compressed-tensors pads them. vLLM serves such layers at "
        "tensor-parallel size 1{}",
        owner,
        [list(block) for block in blocks],
        [f"{name} ({shape[0]}x{shape[1]})" for name, (shape, _) in padded.items()],
        ""
        if not refused
        else f", but refuses {refused}: fused with a later sibling, their output features must "
        "be whole blocks",
    )
    return list(padded)


def _fused_first(name: str) -> bool:
    """Whether vLLM fuses the layer ``name`` with a sibling loaded after it (q/k of q/k/v, the
    gate of gate/up)."""
    leaf = name.rpartition(".")[2]
    return any(leaf in siblings[:-1] for siblings in FUSED_SIBLINGS)
