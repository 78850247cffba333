"""The layers smoothing folds scales into, and the folding itself.

A *smooth layer* produces the channels that smoothing divides by ``s``: a normalization layer
(any module with a per-channel ``weight`` and optional ``bias``, applied last: LayerNorm,
RMSNorm of any library) or a linear layer (its output rows). The *balance layers* read those
channels and take ``s`` in their input columns (:func:`~lightning_compress.modifiers.
input_scaling.scale_inputs`). Other modules that read those channels through a weight matrix
without being compressed (a mixture's router, which must keep routing the same tokens, or an
ignored linear layer) are *passengers*: they take ``s`` in their weight columns too, so the
model's function does not change, but their weights play no part in choosing ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_compress.modifiers.input_scaling import scale_inputs

__all__ = [
    "SmoothingMapping",
    "apply_smoothing",
    "is_linear",
    "is_norm",
    "has_weight_matrix",
    "linear_weight",
    "output_width",
    "scale_outputs",
]


@dataclass(frozen=True, eq=False)
class SmoothingMapping:
    """A smooth layer and the balance layers that read its output channels.

    Args:
        smooth_name: the smooth layer's name.
        smooth: the layer whose output channels are divided by ``s``.
        balance_names: the balance layers' names.
        balances: the linear layers that take ``s`` in their input columns.
        passenger_names: the passengers' names.
        passengers: modules that read the same channels through a weight matrix ``[out, in]``
            and are not compressed (routers, ignored layers): they take ``s`` in their weight
            columns but not part in choosing it.
    """

    smooth_name: str
    smooth: nn.Module
    balance_names: tuple[str, ...]
    balances: tuple[nn.Module, ...]
    passenger_names: tuple[str, ...] = ()
    passengers: tuple[nn.Module, ...] = ()

    @property
    def named_balances(self) -> dict[str, nn.Module]:
        """The balance layers by name."""
        return dict(zip(self.balance_names, self.balances, strict=True))


def apply_smoothing(mapping: SmoothingMapping, scale: Tensor, notify: bool = True) -> None:
    """Divides the smooth layer's outputs by ``scale`` and folds ``scale`` into the balance
    layers' and the passengers' input columns; in exact arithmetic their outputs do not change.

    Args:
        mapping: the layers.
        scale: ``[channels]``, non-zero.
        notify: call the balance layers' input-scale hooks (see
            :func:`~lightning_compress.modifiers.input_scaling.scale_inputs`).
    """
    scale_outputs(mapping.smooth, 1 / scale)
    scale_inputs(mapping.balances, scale, notify=notify)
    for passenger in mapping.passengers:
        _scale_columns(passenger, scale)


@torch.no_grad()
def _scale_columns(module: nn.Module, scale: Tensor) -> None:
    """Multiplies the input columns of a passenger's weight matrix by ``scale``."""
    if is_linear(module):
        scale_inputs([module], scale, notify=False)
        return
    weight = module.weight
    factors = scale.to(device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
    weight.copy_(weight * factors)


def has_weight_matrix(module: nn.Module) -> bool:
    """Whether ``module`` may read its input through a weight matrix ``[out, in]`` of its own:
    a linear layer, or a module such as a mixture's router that applies ``F.linear`` to its
    input with a 2-D floating-point ``weight`` and has no submodules.

    Args:
        module: the module.

    Returns:
        True for such a module (whether it reads a given input linearly is checked on data).
    """
    if is_linear(module):
        return True
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.is_floating_point()
        and next(module.children(), None) is None
        and not isinstance(module, nn.Embedding)
    )


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` (a model's ``Conv1D`` and fused experts are, once
    linearized: see :func:`~lightning_compress.layers.linearize`).

    Args:
        module: the module.

    Returns:
        True for a linear layer.
    """
    return isinstance(module, nn.Linear)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` has a per-channel ``weight`` (and optional ``bias``) to fold into.

    Args:
        module: the module.

    Returns:
        True when ``weight`` is a 1-D tensor and ``bias`` is None or of the same shape.
    """
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return False
    return bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape)


def output_width(module: nn.Module) -> int:
    """How many channels a smooth layer produces.

    Args:
        module: a normalization or linear layer.

    Returns:
        ``weight.numel()`` for a normalization layer, the output features of a linear one.
    """
    if is_norm(module):
        return module.weight.numel()
    return module.out_features


def linear_weight(module: nn.Module) -> Tensor:
    """A linear layer's weight ``[out, in]``.

    Args:
        module: an ``nn.Linear``.

    Returns:
        Its weight.
    """
    return module.weight


@torch.no_grad()
def scale_outputs(module: nn.Module, factors: Tensor) -> None:
    """Multiplies a smooth layer's output channels by ``factors`` (weight and bias).

    Args:
        module: a normalization or linear layer.
        factors: ``[channels]``, applied in float32 (or the weight's dtype when wider).

    Raises:
        TypeError: for a module that is neither.
    """
    if not (is_norm(module) or is_linear(module)):
        raise TypeError(
            f"a {type(module).__name__} cannot scale its output channels; expected a "
            "normalization layer or an nn.Linear"
        )
    for tensor in (module.weight, getattr(module, "bias", None)):
        if tensor is not None:
            dtype = torch.promote_types(tensor.dtype, torch.float32)
            scaled = factors.to(device=tensor.device, dtype=dtype)
            # output channels run along the first axis of a weight matrix
            tensor.copy_(tensor * (scaled.view(-1, 1) if tensor.dim() > 1 else scaled))
