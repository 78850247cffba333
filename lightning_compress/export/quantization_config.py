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
from compressed_tensors.quantization import QuantizationArgs as CTQuantizationArgs
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from torch import nn

from lightning_compress.export.errors import ExportError
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.kv_cache import (
    ATTENTION_SCHEME_ATTRIBUTE,
    AttentionScheme,
)

__all__ = [
    "LINEAR_TARGET",
    "attention_schemes",
    "config_from_schemes",
    "linear_names",
    "quantization_config",
]

LINEAR_TARGET = "Linear"
"""The class-name target compressed-tensors (and vLLM) match every linear layer with."""

Layers = dict[str, tuple[nn.Module, CTQuantizationScheme]]


def quantization_config(model: nn.Module, layers: Layers) -> dict[str, Any] | None:
    """Describes how ``model`` is stored: its config groups and ignored layers.

    Layers with equal schemes form one config group. The largest group of linear layers (the
    last one) targets the class ``Linear`` (and its embeddings by name) and every unquantized
    linear layer is listed in ``ignore``; other groups list their layers by name, which
    compressed-tensors and vLLM match before class names. So each layer is read back with
    exactly its own scheme. The ``sparsity_config`` is empty, as compressed-tensors writes
    it, whether or not the model is pruned (see :mod:`lightning_compress.export.sparsity`).

    Calibrated attention modules (``kv_cache_scheme``) give the ``kv_cache_scheme`` entry;
    those whose queries are quantized also get a config group naming them with only
    ``input_activations``, as compressed-tensors writes attention quantization. Their scales
    are the modules' ``k_scale`` / ``v_scale`` / ``q_scale`` tensors. Without quantized
    linear layers the format is ``dense`` and nothing is ignored.

    Args:
        model: the model.
        layers: its quantized layers with their compressed-tensors schemes.

    Returns:
        The ``quantization_config`` mapping (``quant_method: compressed-tensors``), or None
        when the model is not quantized.

    Raises:
        ExportError: when attention modules hold different key/value arguments (vLLM reads
            one ``kv_cache_scheme`` for every attention layer).
    """
    return config_from_schemes(
        {name: scheme for name, (_, scheme) in layers.items()},
        {name for name, (module, _) in layers.items() if isinstance(module, nn.Embedding)},
        linear_names(model),
        attention_schemes(model),
    )


def config_from_schemes(
    schemes: dict[str, CTQuantizationScheme],
    embeddings: set[str],
    linears: list[str],
    attention: dict[str, AttentionScheme],
) -> dict[str, Any] | None:
    """The ``quantization_config`` of :func:`quantization_config`, from what it needs of the
    model, recorded without its weights (a checkpoint written block by block).

    Args:
        schemes: each quantized layer's name to its compressed-tensors scheme (``format``
            set), in module order.
        embeddings: the names of the quantized layers that are embeddings.
        linears: every linear layer's name, in module order.
        attention: the calibrated attention modules with their schemes, in module order.

    Returns:
        As :func:`quantization_config`.

    Raises:
        ExportError: as :func:`quantization_config`.
    """
    if not schemes and not attention:
        return None
    entry: dict[str, Any] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
    }
    groups = _config_groups(schemes, embeddings) if schemes else {}
    config = QuantizationConfig(
        config_groups={**groups, **_attention_groups(attention, len(groups))},
        format=_overall_format(schemes) if schemes else CompressionFormat.dense.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=[name for name in linears if name not in schemes] if schemes else [],
        kv_cache_scheme=_kv_cache_scheme(attention),
    )
    entry.update(config.model_dump(exclude={QUANTIZATION_METHOD_NAME}))
    return entry


def attention_schemes(model: nn.Module) -> dict[str, AttentionScheme]:
    """The calibrated attention modules of ``model`` with their schemes.

    Args:
        model: the model.

    Returns:
        Module name to its ``attention_scheme``, in module order.
    """
    return {
        name: getattr(module, ATTENTION_SCHEME_ATTRIBUTE)
        for name, module in model.named_modules()
        if hasattr(module, ATTENTION_SCHEME_ATTRIBUTE)
    }


def _ct_attention_args(args: QuantizationArgs) -> CTQuantizationArgs:
    """Static fp8 arguments of attention states in compressed-tensors terms."""
    return CTQuantizationArgs(
        num_bits=args.num_bits, type=args.type, symmetric=args.symmetric, strategy=args.strategy
    )


def _kv_cache_scheme(attention: dict[str, AttentionScheme]) -> CTQuantizationArgs | None:
    kinds = {scheme.keys_values for scheme in attention.values()}
    if len(kinds) > 1:
        found = sorted({(args.strategy, args.observer) for args in kinds})
        raise ExportError(
            f"attention modules hold different key/value arguments ((strategy, observer): "
            f"{found}); vLLM reads one kv_cache_scheme for every attention layer: expected "
            "one kv_cache_scheme (and attention groups with the same arguments)"
        )
    return _ct_attention_args(kinds.pop()) if kinds else None


def _attention_groups(
    attention: dict[str, AttentionScheme], first: int
) -> dict[str, CTQuantizationScheme]:
    """One group per distinct query arguments, naming its attention modules."""
    groups: dict[QuantizationArgs, list[str]] = {}
    for name, scheme in attention.items():
        if scheme.queries is not None:
            groups.setdefault(scheme.queries, []).append(name)
    return {
        f"group_{first + index}": CTQuantizationScheme(
            targets=names, input_activations=_ct_attention_args(args)
        )
        for index, (args, names) in enumerate(groups.items())
    }


def linear_names(model: nn.Module) -> list[str]:
    """The linear layers of ``model``, in module order.

    Args:
        model: the model (its weights may be on the meta device).

    Returns:
        The names of the layers whose class is (or derives from) ``Linear``.
    """
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _config_groups(
    schemes: dict[str, CTQuantizationScheme], embeddings: set[str]
) -> dict[str, CTQuantizationScheme]:
    groups: dict[str, list[str]] = {}
    first: dict[str, CTQuantizationScheme] = {}
    for name, scheme in schemes.items():
        key = scheme.model_dump_json(exclude={"targets"})
        groups.setdefault(key, []).append(name)
        first.setdefault(key, scheme)
    # the class target does not cover embeddings: they stay named
    others = {key: [n for n in names if n in embeddings] for key, names in groups.items()}
    linear = [key for key in groups if len(others[key]) < len(groups[key])]
    largest = max(linear, key=lambda key: len(groups[key])) if linear else None
    # Named groups first: compressed-tensors matches each layer to its first matching target.
    order = [key for key in groups if key != largest] + ([largest] if linear else [])
    return {
        f"group_{index}": first[key].model_copy(
            update={"targets": [LINEAR_TARGET, *others[key]] if key == largest else groups[key]}
        )
        for index, key in enumerate(order)
    }


def _overall_format(schemes: dict[str, CTQuantizationScheme]) -> str:
    formats = {CompressionFormat(scheme.format).value for scheme in schemes.values()}
    return formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
