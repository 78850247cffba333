"""The tensors one quantized linear layer is stored as, by name, shape and dtype.

Two layouts matter for a scheme and a layer shape: the one compressed-tensors *writes*
(its compressor run on a layer of zero codes), which is what a checkpoint of that format
holds; and the one transformers' ``from_pretrained`` *prepares* to receive (the layer
initialized with the scheme and compressed on the meta device, as
``CompressedTensorsHfQuantizer._process_model_before_weight_loading`` does). A checkpoint
loads in the installed transformers only where the two agree.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from compressed_tensors.quantization.lifecycle.initialize import (
    initialize_module_for_quantization,
)
from compressed_tensors.utils.module import get_direct_state_dict
from torch import Tensor, nn

__all__ = [
    "Layout",
    "asymmetric_int_weights",
    "differences",
    "layout_of",
    "prepared_layout",
    "scheme_key",
    "written_layout",
]

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Tensor name to shape and dtype."""

WIDE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Dtypes transformers converts into one another when it loads a tensor."""


def asymmetric_int_weights(scheme: CTQuantizationScheme) -> bool:
    """Whether ``scheme`` quantizes weights to asymmetric ints (stored with zero points).

    Args:
        scheme: a compressed-tensors scheme.

    Returns:
        True for int weights with ``symmetric: false``.
    """
    weights = scheme.weights
    return weights is not None and weights.type == "int" and not weights.symmetric


def layout_of(tensors: dict[str, Tensor]) -> Layout:
    """The layout of ``tensors``.

    Args:
        tensors: tensors by name.

    Returns:
        Each name with its shape and dtype.
    """
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}


def written_layout(
    shape: tuple[int, int], bias: bool, dtype: torch.dtype, scheme: CTQuantizationScheme
) -> Layout:
    """What compressed-tensors writes for a linear layer in ``scheme.format``.

    Args:
        shape: the layer's weight shape ``(out_features, in_features)``.
        bias: whether the layer has a bias.
        dtype: the dtype of its weight.
        scheme: its scheme, with ``format`` set.

    Returns:
        The layout of the stored tensors.
    """
    return _layout(tuple(shape), bias, dtype, scheme_key(scheme), "cpu")


def prepared_layout(
    shape: tuple[int, int], bias: bool, dtype: torch.dtype, scheme: CTQuantizationScheme
) -> Layout:
    """What transformers' ``from_pretrained`` prepares to load into such a layer.

    Args:
        shape: the layer's weight shape ``(out_features, in_features)``.
        bias: whether the layer has a bias.
        dtype: the dtype of its weight.
        scheme: its scheme, with ``format`` set.

    Returns:
        The layout of the tensors the loading model holds for the layer.
    """
    return _layout(tuple(shape), bias, dtype, scheme_key(scheme), "meta")


def differences(found: Layout, expected: Layout) -> list[str]:
    """How ``found`` differs from ``expected``, one phrase per tensor.

    Floating-point tensors of 16 to 64 bits may differ in dtype (loading converts them).

    Args:
        found: the layout at hand.
        expected: the layout it should have.

    Returns:
        The differences; empty when the layouts agree.
    """
    missing = [f"{name} missing" for name in expected if name not in found]
    extra = [f"unexpected {name}" for name in found if name not in expected]
    changed = []
    for name in found.keys() & expected.keys():
        (shape, dtype), (want_shape, want_dtype) = found[name], expected[name]
        convertible = dtype in WIDE_FLOATS and want_dtype in WIDE_FLOATS
        if shape != want_shape or (dtype != want_dtype and not convertible):
            changed.append(
                f"{name} is {_describe(shape, dtype)}, expected {_describe(want_shape, want_dtype)}"
            )
    return missing + extra + sorted(changed)


def scheme_key(scheme: CTQuantizationScheme) -> str:
    """The scheme as JSON without its targets, which do not change how a layer is stored:
    layers of one shape and scheme share one computed layout.

    Args:
        scheme: a compressed-tensors scheme.

    Returns:
        A string equal for schemes that store layers alike.
    """
    return scheme.model_copy(update={"targets": []}).model_dump_json()


@lru_cache(maxsize=256)
def _layout(
    shape: tuple[int, ...], bias: bool, dtype: torch.dtype, scheme_json: str, device: str
) -> Layout:
    """A layer of zero codes initialized for the scheme, compressed on ``device``."""
    scheme = CTQuantizationScheme.model_validate_json(scheme_json)
    out_features, in_features = shape
    layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    initialize_module_for_quantization(layer, scheme, force_zero_point=False)
    state = {
        name: tensor for name, tensor in get_direct_state_dict(layer).items() if tensor is not None
    }
    if device != "meta":
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.fill_(1 if name.endswith("_scale") else 0)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return layout_of(compressor.compress(state, scheme))


def _describe(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{list(shape)} {str(dtype).removeprefix('torch.')}"
