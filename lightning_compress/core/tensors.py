"""Tensor helpers shared by the modifiers and the pipelines: walking nested inputs and telling
whether two tensors are the same input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["map_tensors", "same_input", "tensor_version"]


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts.

    Args:
        value: a tensor, a container of them, or anything else (returned as is).
        fn: the function to apply.

    Returns:
        The same structure with ``fn`` applied to its tensors.
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(item, fn) for item in value)
    if isinstance(value, list):
        return [map_tensors(item, fn) for item in value]
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    return value


def same_input(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` is ``a`` or a view of the same memory with the same layout.

    Args:
        a: a tensor the caller keeps alive, so its memory cannot have been reused.
        b: the tensor to compare with it.

    Returns:
        True when ``b`` is ``a``, or has its data pointer, shape, strides, dtype and device.
    """
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def tensor_version(x: Tensor) -> int:
    """The in-place modification counter of ``x``: it changes when ``x`` is modified in place.

    Args:
        x: a tensor.

    Returns:
        ``x._version``, or 0 for an inference tensor (which has none and cannot change).
    """
    return 0 if x.is_inference() else x._version
