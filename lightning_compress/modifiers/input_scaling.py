"""Rescaling the inputs of linear layers, and telling whoever gathered statistics of them.

Smoothing (SmoothQuant, AWQ) divides the inputs of linear layers by a per-channel scale ``s``
(folded into the layer that produces them) and multiplies the layers' weight columns by ``s``,
so their outputs do not change. A later modifier of the same recipe may already have gathered
statistics of those inputs in the same calibration forward, e.g. GPTQ's Hessians. They can be
corrected exactly, ``x' = x / s`` giving ``H' = diag(1/s) H diag(1/s)``, so a whole chain runs
in one calibration pass: a collector registers an *input-scale hook* on each layer it observes
(:func:`register_input_scale_hook`, or :func:`follow_input_scaling` for named layers), and
:func:`scale_inputs` changes the weights and calls every distinct hook once, with the layers it
was registered on and the scale.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "InputScaleHook",
    "follow_input_scaling",
    "register_input_scale_hook",
    "scale_inputs",
]

InputScaleHook = Callable[[list[nn.Module], Tensor], None]
"""``hook(layers, scale)``: the inputs of ``layers`` (those of the call it was registered on)
are now ``x / scale``; ``scale`` is ``[in_features]``."""

_HOOKS: weakref.WeakKeyDictionary[nn.Module, OrderedDict[int, InputScaleHook]] = (
    weakref.WeakKeyDictionary()
)


def register_input_scale_hook(module: nn.Module, hook: InputScaleHook) -> RemovableHandle:
    """Calls ``hook`` whenever :func:`scale_inputs` rescales the inputs of ``module``.

    Hooks are kept beside the module, not on it, and only as long as the module lives.

    Args:
        module: the layer.
        hook: called as ``hook(layers, scale)``; registering the same hook on several layers
            makes one call per :func:`scale_inputs` with all of them.

    Returns:
        A handle whose ``remove()`` unregisters the hook.
    """
    hooks = _HOOKS.setdefault(module, OrderedDict())
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


def follow_input_scaling(
    layers: dict[str, nn.Module], rescale: Callable[[list[str], Tensor], None]
) -> list[RemovableHandle]:
    """Registers one input-scale hook on named layers that reports the rescaled ones by name.

    Args:
        layers: the layers, by name.
        rescale: called as ``rescale(names, scale)`` once per :func:`scale_inputs` touching
            any of ``layers``.

    Returns:
        The handles, one per layer.
    """
    names = {id(module): name for name, module in layers.items()}

    def hook(scaled: list[nn.Module], scale: Tensor) -> None:
        rescale([names[id(module)] for module in scaled], scale)

    return [register_input_scale_hook(module, hook) for module in layers.values()]


@torch.no_grad()
def scale_inputs(layers: Sequence[nn.Module], scale: Tensor, notify: bool = True) -> None:
    """Multiplies the layers' weight columns by ``scale``, for inputs divided by ``scale``.

    Args:
        layers: ``nn.Linear`` layers reading the same channels (a model's ``Conv1D`` and
            fused experts are ``nn.Linear`` layers once linearized, see
            :func:`~lightning_compress.layers.linearize`).
        scale: ``[in_features]``; computed in float32 (or the weight's dtype when wider).
        notify: call the input-scale hooks registered on ``layers``, each distinct hook once
            with the layers it is registered on (a trial that will be undone passes False).

    Raises:
        TypeError: for a layer that is not an ``nn.Linear``.
        ValueError: when ``scale`` does not have one value per input channel.
    """
    for layer in layers:
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"a {type(layer).__name__} cannot take a scale in its input channels; expected "
                "an nn.Linear (linearize the model first: lightning_compress.layers.linearize)"
            )
        weight = layer.weight
        if scale.shape != (layer.in_features,):
            raise ValueError(
                f"a scale of shape {tuple(scale.shape)} does not fit a "
                f"{type(layer).__name__} with {layer.in_features} input channels"
            )
        factors = scale.to(
            device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32)
        )
        weight.copy_(weight * factors)
    if not notify:
        return
    calls: dict[InputScaleHook, list[nn.Module]] = {}
    for layer in layers:
        for hook in _HOOKS.get(layer, {}).values():
            calls.setdefault(hook, []).append(layer)
    for hook, scaled in calls.items():
        hook(scaled, scale)
