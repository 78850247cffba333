"""Quantization-aware training: fake-quantized weights and trained static activation ranges.

The weight is fake-quantized by a parametrization (``torch.nn.utils.parametrize``): the layer
computes its matmul once, on the quantized weight, and the straight-through estimator passes
the gradient to the float weight (``parametrizations.weight.original``), which the optimizer
updates. Inputs are fake-quantized by the inference hook of
:mod:`~lightning_compress.modifiers.quantization.runtime`; for static input activations a
:class:`TrainingInputObserver` runs just before it and updates ``input_scale`` /
``input_zero_point`` from each training batch.

Everything a run needs lives in the layer's buffers (compressed-tensors names for qparams,
``input_min_vals`` / ``input_max_vals`` for observer statistics), so a checkpoint restores
it exactly; the Python objects only carry switches (``enabled``, ``frozen``) that the
modifier sets from the training step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.utils import parametrize

from lightning_compress.core.distributed import all_reduce_max_, all_reduce_min_
from lightning_compress.core.recomputation import recomputing
from lightning_compress.modifiers.quantization.args import (
    DYNAMIC_LOCAL,
    QuantizationArgs,
    QuantizationScheme,
)
from lightning_compress.modifiers.quantization.observers import observer_for
from lightning_compress.modifiers.quantization.ops import (
    calculate_qparams,
    compute_dynamic_qparams,
    fake_quantize_ste,
    global_scale,
    quantized_dtype,
    reduce_min_max,
)
from lightning_compress.modifiers.quantization.runtime import INPUT_GLOBAL_SCALE

__all__ = [
    "OBSERVER_BUFFERS",
    "TrainingInputObserver",
    "WeightFakeQuantizer",
    "add_weight_fake_quantizer",
    "bake_weight",
    "bake_weight_saved_baked",
    "training_buffers",
    "weight_qparams",
]

OBSERVER_BUFFERS = ("input_min_vals", "input_max_vals")
"""Buffers holding the input range statistics of static activations while training."""


def training_buffers(weight: Tensor, scheme: QuantizationScheme) -> dict[str, Tensor]:
    """The buffers a layer needs for quantization-aware training, with initial values.

    They depend only on the weight and the scheme, so a freshly set-up model gets the same
    buffers as the one a checkpoint was saved from, and loads it strictly.

    Args:
        weight: the layer's weight.
        scheme: its quantization scheme.

    Returns:
        ``weight_scale`` / ``weight_zero_point`` (min-max of ``weight``), ``weight_global_scale``
        for strategy ``tensor_group`` and, for static input activations, ``input_scale`` (1)
        and ``input_zero_point`` (0), for ``dynamic: local`` ones (NVFP4) ``input_global_scale``
        (1), with the observer statistics :data:`OBSERVER_BUFFERS` (NaN: nothing observed yet).

    Raises:
        ValueError: for strategy ``tensor_group`` on a weight that is all zero or not finite.
    """
    scale, zero_point, tensor_scale = weight_qparams(weight, scheme.weights)
    buffers = {"weight_scale": scale, "weight_zero_point": zero_point}
    if tensor_scale is not None:
        buffers["weight_global_scale"] = tensor_scale
    inputs = scheme.input_activations
    if inputs is not None and inputs.dynamic is not True:
        device = weight.device
        if inputs.dynamic == DYNAMIC_LOCAL:
            buffers[INPUT_GLOBAL_SCALE] = torch.ones(1, dtype=torch.float32, device=device)
        else:
            buffers["input_scale"] = torch.ones(1, dtype=weight.dtype, device=device)
            buffers["input_zero_point"] = torch.zeros(
                1, dtype=quantized_dtype(inputs), device=device
            )
        for name in OBSERVER_BUFFERS:
            buffers[name] = torch.full((1,), torch.nan, device=device)
    return buffers


def weight_qparams(weight: Tensor, args: QuantizationArgs) -> tuple[Tensor, Tensor, Tensor | None]:
    """A weight's min-max qparams as training computes them on every step.

    Args:
        weight: the current weight.
        args: its quantization arguments.

    Returns:
        ``(scale, zero_point, global_scale)``; the global scale (strategy ``tensor_group``,
        NVFP4) is the weight's own, else None.

    Raises:
        ValueError: for strategy ``tensor_group`` on a weight that is all zero or not finite.
    """
    if args.strategy != "tensor_group":
        return (*compute_dynamic_qparams(weight, args), None)
    tensor_scale = global_scale(weight, args, "a weight trained with strategy='tensor_group'")
    ranges = reduce_min_max(weight.detach(), args)
    return (*calculate_qparams(*ranges, args, tensor_scale), tensor_scale)


class WeightFakeQuantizer(nn.Module):
    """Parametrization returning the fake-quantized weight of the layer that owns it.

    While ``enabled`` and not ``frozen``, qparams are computed from the current weight
    (min-max, :func:`weight_qparams`) on every access and written to the owner's
    ``weight_scale`` / ``weight_zero_point`` (and ``weight_global_scale``) buffers; once
    ``frozen`` those buffers are used as they are.
    While not ``enabled`` the weight passes through unchanged.

    The owner is held as a plain attribute, not a submodule, so it is not part of the module
    tree; ``deepcopy`` of the owner maps it to the copy.

    Args:
        owner: the layer whose ``weight`` is parametrized and which holds the qparam buffers.
        args: the weight's quantization arguments.
    """

    owner: nn.Module

    def __init__(self, owner: nn.Module, args: QuantizationArgs) -> None:
        super().__init__()
        vars(self)["owner"] = owner  # not nn.Module.__setattr__: that would make it a child
        self.args = args
        self.enabled = False
        self.frozen = False

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantizes ``weight`` with a straight-through gradient.

        A weight sharded by FSDP2 (a ``DTensor``: read outside the forward pass, e.g. to log
        sparsity) is gathered, so every rank must read it, fake-quantized whole and sharded
        back, without a gradient.

        Args:
            weight: the float weight.

        Returns:
            The fake-quantized weight, or ``weight`` itself while not enabled.
        """
        if not self.enabled:
            return weight
        if isinstance(weight, DTensor):  # sharded: read outside FSDP2's forward (e.g. logging)
            with torch.no_grad():  # FSDP2's forward reads the unsharded weight, with gradients
                return sharded_like(self(weight.full_tensor()), weight)
        owner = self.owner
        if self.frozen:
            scale, zero_point = owner.weight_scale, owner.weight_zero_point
            tensor_scale = owner._buffers.get("weight_global_scale")
        else:
            scale, zero_point, tensor_scale = weight_qparams(weight, self.args)
            with torch.no_grad():
                owner.weight_scale.copy_(scale)
                owner.weight_zero_point.copy_(zero_point)
                if tensor_scale is not None:
                    owner.weight_global_scale.copy_(tensor_scale)
        return fake_quantize_ste(weight, scale, zero_point, self.args, tensor_scale)


def sharded_like(tensor: Tensor, like: DTensor) -> DTensor:
    """``tensor`` (the same full tensor on every rank) sharded like ``like``, without
    communicating.

    Args:
        tensor: the full tensor.
        like: the sharded tensor whose mesh and placements to take.

    Returns:
        This rank's shard of ``tensor`` as a ``DTensor``.
    """
    return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)


def add_weight_fake_quantizer(module: nn.Module, args: QuantizationArgs) -> WeightFakeQuantizer:
    """Parametrizes ``module.weight`` with a (disabled) :class:`WeightFakeQuantizer`.

    ``module`` must already have ``weight_scale`` / ``weight_zero_point`` buffers. The weight
    parameter object is kept (now ``parametrizations.weight.original``), so an optimizer built
    before or after sees the same parameter.

    Args:
        module: the layer.
        args: the weight's quantization arguments.

    Returns:
        The parametrization.
    """
    quantizer = WeightFakeQuantizer(module, args)
    parametrize.register_parametrization(module, "weight", quantizer)
    return quantizer


def bake_weight(module: nn.Module, quantized: bool = True) -> None:
    """Removes the weight's parametrization, leaving a plain parameter.

    Args:
        module: a layer parametrized by :func:`add_weight_fake_quantizer`.
        quantized: keep the fake-quantized value (True) or the float weight (False). The
            parameter object stays the same, so optimizers keep tracking it; its value is
            copied in place (not ``set_``), so the gradient hooks DDP registered on it keep
            firing when training goes on.
    """
    if quantized:
        with torch.no_grad():
            module.parametrizations.weight.original.copy_(module.weight)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def bake_weight_saved_baked(module: nn.Module, state_dict: dict[str, Tensor], prefix: str) -> bool:
    """Bakes ``module`` when ``state_dict`` holds it baked, so that the state dict loads.

    A checkpoint saved after quantization-aware training ended holds the layer's plain
    (quantized) ``weight`` and no observer statistics; a freshly set-up model holds the
    parametrization and the statistics. Called before the layer loads, this makes the layer
    look like the saved one (the values are then loaded over it).

    Args:
        module: a layer parametrized by :func:`add_weight_fake_quantizer`.
        state_dict: the state dict being loaded.
        prefix: the layer's key prefix in ``state_dict``.

    Returns:
        True when the layer was baked.
    """
    saved_baked = f"{prefix}weight" in state_dict
    if not saved_baked or not parametrize.is_parametrized(module, "weight"):
        return False
    bake_weight(module)
    for name in OBSERVER_BUFFERS:
        if f"{prefix}{name}" not in state_dict:
            module._buffers.pop(name, None)
    return True


class TrainingInputObserver:
    """Forward pre-hook that updates static input qparams from training batches.

    In training mode and while not ``frozen`` (and not in activation checkpointing's
    recomputation, which sees the batch again), folds the input into the observer's range and
    writes the range to ``input_min_vals`` / ``input_max_vals`` and the qparams to
    ``input_scale`` / ``input_zero_point`` (for ``dynamic: local`` inputs the global scale to
    ``input_global_scale``, as one-shot calibration computes it). The range is read back from
    the buffers on each call (NaN means nothing observed yet), so a run resumed from a
    checkpoint continues exactly where it stopped.

    Args:
        module: the layer, holding the buffers.
        args: its static input-activation arguments (``minmax`` or ``moving_average``).
    """

    def __init__(self, module: nn.Module, args: QuantizationArgs) -> None:
        self.observer = observer_for(args)
        self.observed = not bool(torch.isnan(module.input_min_vals).any())
        self.frozen = False

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Observes ``inputs[0]`` (reduced across ranks when distributed).

        Args:
            module: the hooked layer.
            inputs: its positional inputs.
        """
        if self.frozen or not module.training or recomputing():
            return
        x = inputs[0]
        observer = self.observer
        observer.reset()
        if self.observed:
            observer.min_vals = module.input_min_vals.to(x.dtype)
            observer.max_vals = module.input_max_vals.to(x.dtype)
        # Under DDP every rank folds in the range of the global batch, so the statistics
        # and the qparams stay identical on all ranks.
        batch_min, batch_max = observer.batch_range(x.detach())
        observer.update_range(all_reduce_min_(batch_min), all_reduce_max_(batch_max))
        with torch.no_grad():
            module.input_min_vals.copy_(observer.min_vals)
            module.input_max_vals.copy_(observer.max_vals)
            if observer.args.dynamic == DYNAMIC_LOCAL:
                what = f"the input of a {type(module).__name__} trained with dynamic='local'"
                module.input_global_scale.copy_(observer.get_global_scale(what))
            else:
                scale, zero_point = observer.get_qparams()
                module.input_scale.copy_(scale)
                module.input_zero_point.copy_(zero_point)
        self.observed = True
