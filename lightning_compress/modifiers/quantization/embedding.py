"""Embeddings as quantization targets: their table is quantized like a linear layer's weight.

An ``nn.Embedding`` weight ``[num_embeddings, embedding_dim]`` is quantized as llm-compressor
0.14 and compressed-tensors quantize it: like a ``Linear`` weight ``[out_features,
in_features]`` (strategy ``channel``: one scale per row, i.e. per token; ``group``: groups
along ``embedding_dim``), round-to-nearest one-shot, or fake-quantized while training, so the
embedding's forward looks rows up in the quantized table. Only the weights are quantized: the
inputs are token ids, so a scheme with ``input_activations`` or ``output_activations`` on an
embedding is refused. GPTQ, SparseGPT and AWQ refuse embeddings (they need the layer's input
activations, e.g. GPTQ's Hessian), as does every modifier other than ``QuantizationModifier``.
fp4 weights (NVFP4, MXFP4) are refused too: compressed-tensors stores them packed, and
transformers 5.25 cannot load a packed embedding.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lightning_compress.modifiers.layerwise import linear_layers
from lightning_compress.modifiers.quantization.args import QuantizationScheme
from lightning_compress.recipe.errors import RecipeError

__all__ = ["quantized_layers"]


def quantized_layers(
    owner: str,
    layers: Mapping[str, nn.Module],
    scheme: QuantizationScheme,
    embeddings: bool,
) -> dict[str, nn.Module]:
    """Checks that every targeted layer is a ``Linear`` or, where allowed, an ``Embedding``
    quantized weights only.

    Args:
        owner: the modifier's class name.
        layers: the layers ``scheme`` targets, by name.
        scheme: their scheme.
        embeddings: whether the modifier quantizes embeddings (round-to-nearest or
            quantization-aware training do; methods that need input activations do not).

    Returns:
        ``layers``.

    Raises:
        RecipeError: naming the first layer that is neither (see
            :func:`~lightning_compress.modifiers.layerwise.linear_layers`), or an embedding
            whose scheme quantizes activations, no weights or fp4 weights.
    """
    tables = {n: m for n, m in layers.items() if isinstance(m, nn.Embedding)} if embeddings else {}
    linear_layers(owner, {name: m for name, m in layers.items() if name not in tables})
    for name in tables:
        problem = _embedding_problem(scheme)
        if problem is not None:
            raise RecipeError(
                f"{owner}.targets: layer '{name}' is an Embedding and its scheme (targets "
                f"{scheme.targets}) {problem}; expected int or fp8 weights only (an embedding's "
                "inputs are token ids): give embeddings a config group of their own with only "
                "such weights, or add the layer to ignore"
            )
    return dict(layers)


def _embedding_problem(scheme: QuantizationScheme) -> str | None:
    """What keeps ``scheme`` off an embedding, or None."""
    roles = [
        role
        for role in ("input_activations", "output_activations")
        if getattr(scheme, role) is not None
    ]
    if roles:
        return f"quantizes {roles}"
    if scheme.weights is None:
        return "quantizes no weights"
    if scheme.weights.type == "float" and scheme.weights.num_bits == 4:
        return (
            "has fp4 weights, which compressed-tensors stores packed (weight_packed) and "
            "transformers 5.25 cannot load into an embedding, which reads its weight"
        )
    return None
