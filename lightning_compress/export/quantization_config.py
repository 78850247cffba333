"""The ``quantization_config`` entry of ``config.json``, in compressed-tensors layout."""

from __future__ import annotations

from typing import Any

import compressed_tensors
from compressed_tensors.base import (
    COMPRESSION_VERSION_NAME,
    QUANTIZATION_METHOD,
    QUANTIZATION_METHOD_NAME,
    SPARSITY_CONFIG_NAME,
    TRANSFORM_CONFIG_NAME,
)
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from torch import nn

__all__ = ["LINEAR_TARGET", "quantization_config"]

LINEAR_TARGET = "Linear"
"""The class-name target compressed-tensors (and vLLM) match every linear layer with."""

Layers = dict[str, tuple[nn.Module, CTQuantizationScheme]]


def quantization_config(model: nn.Module, layers: Layers) -> dict[str, Any] | None:
    """Describes how ``model`` is stored: its config groups and ignored layers.

    Layers with equal schemes form one config group. The largest group (the last one)
    targets the class ``Linear`` and every unquantized linear layer is listed in ``ignore``;
    other groups list their layers by name, which compressed-tensors and vLLM match before
    class names. So each layer is read back with exactly its own scheme. The
    ``sparsity_config`` is empty, as compressed-tensors writes it, whether or not the model
    is pruned (see :mod:`lightning_compress.export.sparsity`).

    Args:
        model: the model.
        layers: its quantized layers with their compressed-tensors schemes.

    Returns:
        The ``quantization_config`` mapping (``quant_method: compressed-tensors``), or None
        when the model is not quantized.
    """
    if not layers:
        return None
    entry: dict[str, Any] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
    }
    config = QuantizationConfig(
        config_groups=_config_groups(layers),
        format=_overall_format(layers),
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=unmatched_linears(model, set(layers)),
        kv_cache_scheme=None,
    )
    entry.update(config.model_dump(exclude={QUANTIZATION_METHOD_NAME}))
    return entry


def unmatched_linears(model: nn.Module, names: set[str]) -> list[str]:
    """The linear layers of ``model`` not in ``names``, in module order.

    Args:
        model: the model.
        names: the layers a config covers.

    Returns:
        The other layers whose class is (or derives from) ``Linear``.
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in names
    ]


def _config_groups(layers: Layers) -> dict[str, CTQuantizationScheme]:
    groups: dict[str, list[str]] = {}
    schemes: dict[str, CTQuantizationScheme] = {}
    for name, (_, scheme) in layers.items():
        key = scheme.model_dump_json(exclude={"targets"})
        groups.setdefault(key, []).append(name)
        schemes.setdefault(key, scheme)
    largest = max(groups, key=lambda key: len(groups[key]))
    # Named groups first: compressed-tensors matches each layer to its first matching target.
    order = [key for key in groups if key != largest] + [largest]
    return {
        f"group_{index}": schemes[key].model_copy(
            update={"targets": [LINEAR_TARGET] if key == largest else groups[key]}
        )
        for index, key in enumerate(order)
    }


def _overall_format(layers: Layers) -> str:
    formats = {CompressionFormat(scheme.format).value for _, scheme in layers.values()}
    return formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
