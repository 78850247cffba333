"""The KV-cache and attention part of a compressed-tensors checkpoint, read back.

A checkpoint with a ``kv_cache_scheme`` holds ``<attention>.k_scale`` / ``v_scale`` for every
attention module, and ``q_scale`` for those an attention group (a config group with only
``input_activations``) targets; see :mod:`lightning_compress.modifiers.quantization.kv_cache`.
"""

from __future__ import annotations

from compressed_tensors.quantization import QuantizationArgs as CTQuantizationArgs
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from compressed_tensors.utils.match import match_named_modules
from torch import Tensor, nn

from lightning_compress.export.errors import ExportError
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.attention import attention_modules
from lightning_compress.modifiers.quantization.kv_cache import (
    ATTENTION_SCHEME_ATTRIBUTE,
    AttentionScheme,
    check_attention_args,
)
from lightning_compress.modifiers.quantization.kv_cache_math import state_heads

__all__ = ["AttentionState", "is_attention_group", "restore_attention", "take_attention_scales"]

AttentionState = dict[str, tuple[nn.Module, AttentionScheme, dict[str, Tensor]]]
"""Attention module name to ``(module, scheme, scales by buffer name)``."""


def is_attention_group(scheme: CTQuantizationScheme) -> bool:
    """Whether a config group quantizes attention (only ``input_activations``), as
    compressed-tensors writes attention quantization.

    Args:
        scheme: a config group.

    Returns:
        True for an attention group.
    """
    return (
        scheme.weights is None
        and scheme.output_activations is None
        and scheme.input_activations is not None
    )


def take_attention_scales(
    model: nn.Module, config: QuantizationConfig, tensors: dict[str, Tensor], where: str
) -> AttentionState:
    """Removes the attention modules' scales from ``tensors``, checked against the config.

    Args:
        model: the model being loaded.
        config: the checkpoint's quantization config.
        tensors: the checkpoint's tensors by model name; the scales are removed.
        where: the checkpoint, for messages.

    Returns:
        Each quantized attention module with its scheme and scales.

    Raises:
        ExportError: naming the field or tensor when the ``kv_cache_scheme`` or an attention
            group is not one this project runs, an attention group targets a module that is
            not an attention module, or a scale is missing or of the wrong shape.
    """
    found = attention_modules(model)
    plan: dict[str, AttentionScheme] = {}
    if config.kv_cache_scheme is not None:
        args = _our_args(config.kv_cache_scheme, f"{where}: kv_cache_scheme")
        plan = {name: AttentionScheme(args) for name in found}
    for group, scheme in config.config_groups.items():
        if not is_attention_group(scheme):
            continue
        field = f"{where}: config_groups.{group}"
        args = _our_args(scheme.input_activations, f"{field}.input_activations")
        for name, module in match_named_modules(model, scheme.targets, config.ignore):
            if name not in found:
                raise ExportError(
                    f"{field} quantizes the attention of '{name}', a {type(module).__name__}, "
                    "which is not an attention module"
                )
            plan[name] = AttentionScheme(args, queries=args)
    state: AttentionState = {}
    for name, scheme in plan.items():
        module = found[name]
        scales = {}
        for role, args in scheme.roles().items():
            key = f"{name}.{role}_scale"
            scale = tensors.pop(key, None)
            heads = state_heads(module, role) if args.strategy == "attn_head" else None
            shape = (1,) if heads is None else (heads, 1, 1)
            if scale is None or tuple(scale.shape) != shape:
                got = "nothing" if scale is None else f"shape {tuple(scale.shape)}"
                raise ExportError(
                    f"{where}: {key} holds {got}; expected a scale of shape {shape} "
                    f"(strategy {args.strategy!r})"
                )
            scales[f"{role}_scale"] = scale
        state[name] = (module, scheme, scales)
    return state


def restore_attention(state: AttentionState) -> None:
    """Gives each attention module its scales (buffers) and ``attention_scheme``.

    Args:
        state: what :func:`take_attention_scales` returned.
    """
    for module, scheme, scales in state.values():
        device = next(module.parameters()).device
        for buffer, scale in scales.items():
            module.register_buffer(buffer, scale.to(device))
        setattr(module, ATTENTION_SCHEME_ATTRIBUTE, scheme)


def _our_args(args: CTQuantizationArgs, where: str) -> QuantizationArgs:
    """A checkpoint's attention arguments as this project's, refused where it cannot run them."""
    try:
        ours = QuantizationArgs(
            num_bits=args.num_bits,
            type=str(args.type),
            symmetric=args.symmetric,
            strategy=str(args.strategy),
            dynamic=bool(args.dynamic),
        )
        check_attention_args(ours, where)
    except ValueError as err:
        raise ExportError(f"{where}: {err}") from err
    return ours
