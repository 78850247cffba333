"""The compressed-tensors format a layer's scheme is stored in.

compressed-tensors' ``infer_module_format`` picks the format, with one exception here: int
weights with fp8 input activations (the ``W4AFP8`` preset). compressed-tensors 0.20.1 picks
``int-quantized`` for them (one int8 code per weight; its ``pack-quantized`` compressor declines
schemes with float activations), but vLLM reads them packed: ``CompressedTensorsW4A8Fp8`` and
the mixture-of-experts ``CompressedTensorsW4A8Fp8MoEMethod`` (chosen by ``_is_fp8_w4a8_sm90`` in
``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``, whatever
the format) register ``weight_packed`` (eight 4-bit codes per int32), ``weight_scale`` and
``weight_shape``, the layout of ``pack-quantized``. llm-compressor saves its W4AFP8 example with
``quantization_format="pack-quantized"`` "for vLLM compatibility", and transformers dequantizes
per-expert checkpoints from ``weight_packed`` only. Such layers are stored ``pack-quantized``.

And one for embeddings: an ``nn.Embedding`` with int weights is stored ``naive-quantized`` (its
codes as the int8 ``weight``), not ``pack-quantized`` as compressed-tensors picks.
transformers 5.25's ``PreTrainedModel._init_weights`` reads an ``nn.Embedding``'s ``weight``
(unlike a ``Linear``'s, without a check), so ``from_pretrained`` fails on a packed embedding,
which has ``weight_packed`` instead; vLLM serves no quantized embedding in either format.
"""

from __future__ import annotations

from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from torch import nn

__all__ = ["storage_format"]

PACKED = CompressionFormat.pack_quantized.value
NAIVE = CompressionFormat.naive_quantized.value


def storage_format(module_type: type, scheme: CTQuantizationScheme) -> str:
    """The format a layer of ``module_type`` quantized with ``scheme`` is stored in.

    Args:
        module_type: the layer's class, e.g. ``nn.Linear``.
        scheme: its compressed-tensors scheme.

    Returns:
        ``pack-quantized`` for int weights with float input activations, ``naive-quantized``
        for an embedding's int weights; otherwise the format compressed-tensors'
        ``infer_module_format`` picks.
    """
    weights, inputs = scheme.weights, scheme.input_activations
    if issubclass(module_type, nn.Embedding) and weights is not None and weights.type == "int":
        return NAIVE
    if (
        weights is not None
        and weights.type == "int"
        and inputs is not None
        and inputs.type == "float"
    ):
        return PACKED
    return infer_module_format(module_type, scheme).value
