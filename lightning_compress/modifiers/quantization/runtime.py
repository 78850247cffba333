"""The quantized forward of a compressed layer: fake-quantized input activations.

A quantized layer stores its weight already quantized (the quantize→dequantize round trip),
so at run time only its input needs work. That is done by a forward pre-hook returning the
quantized input; the layer's ``forward`` is never replaced. The hook is stateless: it reads the
``quantization_scheme`` attribute and the ``input_scale`` / ``input_zero_point`` buffers (the
``input_global_scale`` buffer for ``dynamic: local`` inputs, NVFP4) of the module it runs on,
so it survives ``deepcopy``, pickling, ``.to()`` and ``load_state_dict``,
and it stays after the modifier that installed it is finalized.

Layers that read one input (q/k/v, gate/up) with equal arguments and qparams quantize it
once: without a gradient, the fake-quantized input is kept beside the input tensor (weakly:
it goes with the input) and handed to the next such layer, as long as neither tensor was
changed in place. The values are those each layer would compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from lightning_compress.modifiers.quantization.args import (
    DYNAMIC_LOCAL,
    QuantizationArgs,
    QuantizationScheme,
)
from lightning_compress.modifiers.quantization.ops import (
    compute_dynamic_qparams,
    fake_quantize,
    fake_quantize_ste,
)

__all__ = [
    "QPARAM_BUFFERS",
    "InputQuantizer",
    "attach_quantization",
    "calibrated_input_buffers",
    "fake_quantize_input",
    "remove_quantization",
]

INPUT_QPARAM_BUFFERS = ("input_scale", "input_zero_point")
INPUT_GLOBAL_SCALE = "input_global_scale"
QPARAM_BUFFERS = (
    "weight_scale",
    "weight_zero_point",
    "weight_global_scale",
    "weight_g_idx",
    *INPUT_QPARAM_BUFFERS,
    INPUT_GLOBAL_SCALE,
)
"""Buffers holding a quantized layer's qparams, named as in compressed-tensors."""


def calibrated_input_buffers(args: QuantizationArgs) -> tuple[str, ...]:
    """The buffers holding what was calibrated of an input's qparams.

    Args:
        args: the input-activation arguments.

    Returns:
        ``input_scale`` / ``input_zero_point`` for static arguments, ``input_global_scale``
        for ``dynamic: local`` ones, nothing for dynamic ones.
    """
    if args.dynamic is True:
        return ()
    return (INPUT_GLOBAL_SCALE,) if args.dynamic == DYNAMIC_LOCAL else INPUT_QPARAM_BUFFERS


def fake_quantize_input(module: nn.Module, x: Tensor) -> Tensor:
    """Fake-quantizes ``x``, the input of ``module``, as its ``quantization_scheme`` says.

    Dynamic arguments compute qparams from ``x`` itself (``dynamic: local`` ones their
    group scales, times the module's ``input_global_scale``); static ones use the module's
    ``input_scale`` / ``input_zero_point`` buffers. When ``x`` requires grad the gradient is
    straight-through (see :func:`~lightning_compress.modifiers.quantization.ops.fake_quantize_ste`).

    Args:
        module: a module with a ``quantization_scheme`` that quantizes input activations.
        x: its input.

    Returns:
        The fake-quantized input, of ``x``'s shape and dtype.
    """
    args = module.quantization_scheme.input_activations
    if not _shareable(x):
        return _fake_quantize_input(module, x, args)
    qparams = _stored_qparams(module, args)
    shared = _SHARED_INPUTS.get(x)
    if shared is not None and shared.serves(x, args, qparams):
        return shared.result
    result = _fake_quantize_input(module, x, args)
    _SHARED_INPUTS[x] = _SharedInput.of(x, args, qparams, result)
    return result


def _fake_quantize_input(module: nn.Module, x: Tensor, args: QuantizationArgs) -> Tensor:
    """:func:`fake_quantize_input` computed for ``module`` alone."""
    tensor_scale = None
    if args.dynamic == DYNAMIC_LOCAL:
        tensor_scale = module.input_global_scale
        scale, zero_point = compute_dynamic_qparams(x, args, tensor_scale)
    elif args.dynamic:
        scale, zero_point = compute_dynamic_qparams(x, args)
    else:
        scale, zero_point = module.input_scale, module.input_zero_point
    round_trip = fake_quantize_ste if x.requires_grad else fake_quantize
    return round_trip(x, scale, zero_point, args, tensor_scale)


def _shareable(x: Tensor) -> bool:
    """Whether ``x``'s fake-quantized value may be kept for other layers: not when it needs a
    gradient, is an inference tensor (no version counter to see in-place changes) or is
    being traced by ``torch.compile``."""
    return not (x.requires_grad or x.is_inference() or torch.compiler.is_compiling())


def _stored_qparams(module: nn.Module, args: QuantizationArgs) -> tuple[Tensor, ...]:
    """The calibrated qparams ``module`` quantizes its input with (none for dynamic inputs)."""
    return tuple(getattr(module, name) for name in calibrated_input_buffers(args))


@dataclass(frozen=True)
class _SharedInput:
    """An input fake-quantized by one layer, kept for the next layer that reads it alike."""

    input_version: int
    args: QuantizationArgs
    qparams: tuple[Tensor, ...]  # copies: the buffers may change in place later
    result: Tensor
    result_version: int

    @classmethod
    def of(
        cls, x: Tensor, args: QuantizationArgs, qparams: tuple[Tensor, ...], result: Tensor
    ) -> _SharedInput:
        """Records that ``result`` is ``x`` quantized with ``args`` and ``qparams``."""
        copies = tuple(qparam.clone() for qparam in qparams)
        return cls(x._version, args, copies, result, result._version)

    def serves(self, x: Tensor, args: QuantizationArgs, qparams: tuple[Tensor, ...]) -> bool:
        """Whether ``result`` is what quantizing ``x`` with ``args`` and ``qparams`` gives."""
        return (
            x._version == self.input_version
            and self.result._version == self.result_version
            and args == self.args
            and len(qparams) == len(self.qparams)
            and all(
                (new.shape, new.dtype, new.device) == (old.shape, old.dtype, old.device)
                and torch.equal(new, old)
                for new, old in zip(qparams, self.qparams, strict=True)
            )
        )


_SHARED_INPUTS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
"""Input tensor -> its :class:`_SharedInput`; an entry goes when its input is freed."""


class InputQuantizer:
    """Forward pre-hook that replaces a module's first input by its fake-quantized value."""

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """Quantizes ``inputs[0]``.

        Args:
            module: the hooked module.
            inputs: its positional inputs.

        Returns:
            The inputs with the first one fake-quantized.
        """
        return (fake_quantize_input(module, inputs[0]), *inputs[1:])


def attach_quantization(module: nn.Module, scheme: QuantizationScheme) -> None:
    """Records ``scheme`` on ``module`` and, if it quantizes inputs, installs the input hook.

    Calling it again with another scheme replaces the scheme; the hook is installed once.

    Args:
        module: the layer, whose weight is already quantized (or fake-quantized in training).
        scheme: how the layer is quantized; stored as ``module.quantization_scheme``.

    Raises:
        ValueError: when ``scheme`` has calibrated input activations and ``module`` lacks
            their buffers (:func:`calibrated_input_buffers`).
    """
    args = scheme.input_activations
    if args is not None:
        missing = [name for name in calibrated_input_buffers(args) if name not in module._buffers]
        if missing:
            raise ValueError(
                f"{type(module).__name__} has calibrated input_activations (dynamic="
                f"{args.dynamic!r}) but no {missing} buffers; calibrate it first, or use "
                "dynamic input_activations"
            )
    module.quantization_scheme = scheme
    if args is not None and not _input_quantizer_ids(module):
        module.register_forward_pre_hook(InputQuantizer())


def remove_quantization(model: nn.Module) -> list[str]:
    """Undoes :func:`attach_quantization` on every module of ``model``.

    Removes the input hooks, the ``quantization_scheme`` attributes and the qparam buffers
    (:data:`QPARAM_BUFFERS`). Weights keep their values: a quantized weight stays quantized,
    so the model runs weight-only quantized with full-precision activations.

    Args:
        model: the model (or a single layer).

    Returns:
        The names of the modules that were quantized (``""`` for ``model`` itself).
    """
    cleared = []
    for name, module in model.named_modules():
        hook_ids = _input_quantizer_ids(module)
        if not hook_ids and not hasattr(module, "quantization_scheme"):
            continue
        for hook_id in hook_ids:
            del module._forward_pre_hooks[hook_id]
        for buffer in QPARAM_BUFFERS:
            module._buffers.pop(buffer, None)
        vars(module).pop("quantization_scheme", None)
        cleared.append(name)
    return cleared


def _input_quantizer_ids(module: nn.Module) -> list[int]:
    return [
        hook_id
        for hook_id, hook in module._forward_pre_hooks.items()
        if isinstance(hook, InputQuantizer)
    ]
