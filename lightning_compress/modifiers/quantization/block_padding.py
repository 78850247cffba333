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
blocks; and its block kernels need whole blocks of input features (compressed-tensors'
``initialize`` notes it: only the rows may be padded). The ``FP8_BLOCK`` preset's activations,
in groups of 128, need whole groups of input features anyway.
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
    refused = {name: _refusal(name, shape, block) for name, (shape, block) in padded.items()}
    refused = {name: reason for name, reason in refused.items() if reason}
    logger.warning(
        "{}: block_structure {} does not tile the weights of {}; they are padded with zeros to "
        "whole blocks, as compressed-tensors pads them. vLLM loads such layers at "
        "tensor-parallel size 1{}",
        owner,
        [list(block) for block in blocks],
        [f"{name} ({shape[0]}x{shape[1]})" for name, (shape, _) in padded.items()],
        "" if not refused else f", but not {refused}",
    )
    return list(padded)


def _refusal(name: str, shape: tuple[int, int], block: tuple[int, int]) -> str | None:
    """Why vLLM refuses the padded layer ``name``, or None when it loads it."""
    if shape[1] % block[1]:
        return "input features not whole blocks, which the block kernels of vLLM need"
    leaf = name.rpartition(".")[2]
    if shape[0] % block[0] and any(leaf in siblings[:-1] for siblings in FUSED_SIBLINGS):
        return "fused with a later sibling, its output features must be whole blocks"
    return None
