"""Numerics of attention states (queries, keys, values ``[batch, heads, tokens, head_dim]``):
their fp8 scales and fake quantization, per tensor or per head.

Per head (``attn_head``) reuses the per-row (``channel``) strategy on the head-major view
``[heads, batch, tokens, head_dim]``, so the rounding, clamping and straight-through gradient
are those of :mod:`~lightning_compress.modifiers.quantization.ops`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.calibration import CalibrationObserver
from lightning_compress.modifiers.quantization.observers import Observer
from lightning_compress.modifiers.quantization.ops import fake_quantize, fake_quantize_ste

__all__ = [
    "fake_quantize_states",
    "head_major",
    "observe_states",
    "state_heads",
    "state_observer",
    "state_scale",
]


def head_major(x: Tensor, args: QuantizationArgs) -> tuple[Tensor, QuantizationArgs]:
    """Lays out an attention state so that the existing strategies compute its qparams.

    Args:
        x: the state, ``[batch, heads, tokens, head_dim]``.
        args: its arguments (strategy ``tensor`` or ``attn_head``).

    Returns:
        ``(x, args)`` for ``tensor``; for ``attn_head`` the view
        ``[heads, batch, tokens, head_dim]`` with per-row (``channel``) arguments.
    """
    if args.strategy == "attn_head":
        return x.transpose(0, 1), replace(args, strategy="channel")
    return x, args


def observe_states(observer: Observer, x: Tensor, args: QuantizationArgs) -> None:
    """Folds the range of ``x`` (one attention state) into ``observer``.

    Args:
        observer: the observer (``state_observer(...).observer``) for ``args``.
        x: the state, ``[batch, heads, tokens, head_dim]``.
        args: its arguments.
    """
    observer.update(head_major(x, args)[0])


def state_observer(name: str, args: QuantizationArgs) -> CalibrationObserver:
    """A fresh calibration observer of one attention state quantized with ``args``.

    Args:
        name: the attention module's name, for messages.
        args: the arguments (strategy ``tensor`` or ``attn_head``).

    Returns:
        The observer (its ranges are per tensor ``[1]`` or per head ``[heads, 1]``).
    """
    return CalibrationObserver(name, head_major(torch.empty(1, 1), args)[1])


def state_scale(observer: Observer, args: QuantizationArgs, dtype: torch.dtype) -> Tensor:
    """The scale of the states ``observer`` saw: ``max|x| / 448``.

    Args:
        observer: the observer (``state_observer(...).observer``) that saw some states.
        args: their arguments.
        dtype: the scale's dtype (the attention module's).

    Returns:
        ``[1]`` for ``tensor``, ``[heads, 1, 1]`` for ``attn_head``.
    """
    scale, _ = observer.get_qparams()
    shape = (-1, 1, 1) if args.strategy == "attn_head" else (1,)
    return scale.reshape(shape).to(dtype)


def fake_quantize_states(x: Tensor, scale: Tensor, args: QuantizationArgs) -> Tensor:
    """Quantizes then dequantizes an attention state with its scale.

    When ``x`` requires grad the gradient is straight-through (zero where ``x`` was clamped).

    Args:
        x: the state, ``[batch, heads, tokens, head_dim]``.
        scale: ``[1]`` or ``[heads, 1, 1]``.
        args: its arguments.

    Returns:
        ``x`` fake-quantized, same shape and dtype.

    Raises:
        ValueError: when the scale's heads do not match ``x``'s.
    """
    view, grouped = head_major(x, args)
    if grouped.strategy == "channel":
        if scale.shape[0] != x.shape[1]:
            raise ValueError(
                f"a per-head scale of shape {tuple(scale.shape)} does not fit states of shape "
                f"{tuple(x.shape)}: expected {x.shape[1]} heads"
            )
        scale = scale.reshape(-1, 1)
    round_trip = fake_quantize_ste if x.requires_grad else fake_quantize
    out = round_trip(view, scale.to(x.dtype), None, grouped)
    return out.transpose(0, 1) if grouped.strategy == "channel" else out


def state_heads(module: nn.Module, role: str) -> int:
    """How many heads the states ``role`` of ``module`` have (from its transformers config).

    Args:
        module: an attention module with a transformers ``config``.
        role: ``q``, ``k`` or ``v``.

    Returns:
        Query heads for ``q``, key/value heads for ``k`` and ``v``.
    """
    config = module.config
    if role == "q":
        return config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
