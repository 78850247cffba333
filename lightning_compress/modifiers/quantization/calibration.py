"""One-shot calibration: observe a layer's inputs, then compute all of its qparams at once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_max_, all_reduce_min_
from lightning_compress.modifiers.layerwise_modifier import CompressedLayer
from lightning_compress.modifiers.quantization.args import (
    DYNAMIC_LOCAL,
    QuantizationArgs,
    QuantizationScheme,
)
from lightning_compress.modifiers.quantization.observers import (
    observer_for,
    qparams_and_global_scale,
    qparams_for_weight,
)
from lightning_compress.modifiers.quantization.ops import fake_quantize
from lightning_compress.modifiers.quantization.runtime import INPUT_GLOBAL_SCALE
from lightning_compress.recipe.errors import RecipeError

__all__ = ["CalibrationObserver", "quantize_layer", "quantized_layer", "relative_error"]


class CalibrationObserver:
    """Forward pre-hook folding a layer's inputs into its calibrated input-activation range
    (per scale for static inputs, the whole tensor's for ``dynamic: local`` ones).

    Args:
        name: the layer's name, for error messages.
        args: the layer's static or ``dynamic: local`` input-activation arguments.
    """

    def __init__(self, name: str, args: QuantizationArgs) -> None:
        self.name = name
        self.observer = observer_for(args)

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Observes ``inputs[0]``.

        Args:
            module: the hooked layer.
            inputs: its positional inputs.

        Raises:
            ValueError: when the input holds NaN or Inf; the message names the layer.
        """
        self.observer.update(inputs[0])
        ranges = torch.stack([self.observer.min_vals, self.observer.max_vals])
        if not bool(torch.isfinite(ranges).all()):
            raise ValueError(
                f"layer '{self.name}' received NaN or Inf input activations during "
                "calibration; expected finite values (check the calibration data and the "
                "model's dtype, or add the layer to ignore)"
            )

    def reduce_across_ranks(self) -> None:
        """Replaces the observed range by its extremes over all ranks (unchanged on one process).

        Every rank must call it for the same layers in the same order. With the ``minmax``
        and ``mse`` observers the result is the range one process seeing all the data gets;
        a ``moving_average`` depends on the order of the batches, so it only approximates it.
        A rank that saw nothing takes the others' range (in float32).
        """
        observer = self.observer
        seen = observer.min_vals is not None
        dtype = observer.min_vals.dtype if seen else torch.float32
        # float64 holds every floating dtype exactly, and is what a rank without data sends.
        nothing = torch.full((1,), torch.inf, dtype=torch.double)
        low = observer.min_vals.double() if seen else nothing
        high = observer.max_vals.double() if seen else -nothing
        all_reduce_min_(low)
        all_reduce_max_(high)
        if bool(torch.isfinite(low).all()):
            observer.min_vals, observer.max_vals = low.to(dtype), high.to(dtype)

    def buffers(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """Returns the calibrated input buffers: ``input_scale`` (in ``dtype``) and
        ``input_zero_point``, or for ``dynamic: local`` inputs (NVFP4) ``input_global_scale``
        (float32, ``448 * 6 / max|x|`` as compressed-tensors and vLLM store it).

        Args:
            dtype: the dtype of the layer's weight, which its input scale takes.

        Returns:
            The buffers by name.

        Raises:
            RecipeError: when the layer saw no input; the message names it.
            ValueError: naming the layer when a ``dynamic: local`` input was all zero.
        """
        if self.observer.min_vals is None:
            raise RecipeError(
                f"layer '{self.name}' quantizes input_activations "
                f"with calibrated qparams (dynamic={self.observer.args.dynamic!r}), which needs "
                "calibration data, but it saw none; expected calibration batches run through "
                "the model between CALIBRATION_EPOCH_START and the layer's SEQUENTIAL_EPOCH_END "
                "or CALIBRATION_EPOCH_END, or dynamic=True (e.g. scheme FP8_DYNAMIC)"
            )
        if self.observer.args.dynamic == DYNAMIC_LOCAL:
            name = f"layer '{self.name}' input"
            return {INPUT_GLOBAL_SCALE: self.observer.get_global_scale(name)}
        input_scale, input_zero_point = self.observer.get_qparams()
        return {"input_scale": input_scale.to(dtype), "input_zero_point": input_zero_point}


def quantized_layer(
    weight: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    observer: CalibrationObserver | None,
    g_idx: Tensor | None = None,
    loss: float | None = None,
) -> CompressedLayer:
    """Gathers a quantized weight and its qparams, adding the calibrated input qparams.

    Args:
        weight: the quantized (quantize→dequantize) weight.
        scale: its ``weight_scale``.
        zero_point: its ``weight_zero_point``.
        observer: the calibration observer of static input activations, else None.
        g_idx: the group of each input column, when it is not ``column // group_size``.
        loss: the method's reconstruction loss for the layer, where it has one.

    Returns:
        The layer with the buffers ``weight_scale``, ``weight_zero_point``, and
        ``weight_g_idx``, ``input_scale``, ``input_zero_point`` (``input_global_scale`` for
        ``dynamic: local`` inputs) where they apply.

    Raises:
        RecipeError: when calibrated input activations saw no calibration data.
        ValueError: naming the layer when a ``dynamic: local`` input was all zero.
    """
    buffers = {"weight_scale": scale, "weight_zero_point": zero_point}
    if g_idx is not None:
        buffers["weight_g_idx"] = g_idx
    if observer is not None:
        buffers.update(observer.buffers(weight.dtype))
    return CompressedLayer(weight, buffers, loss)


@torch.no_grad()
def quantize_layer(
    module: nn.Linear,
    scheme: QuantizationScheme,
    observer: CalibrationObserver | None,
    name: str = "",
    shared_global_scale: Tensor | None = None,
) -> CompressedLayer:
    """Computes a layer's quantized weight and its qparams, leaving the layer unchanged.

    Args:
        module: the layer.
        scheme: how to quantize it; ``weights`` use their configured observer.
        observer: the calibration observer of its static input activations, else None.
        name: the layer's name, for error messages.
        shared_global_scale: for strategy ``tensor_group``, the global scale the layer shares
            with the layers vLLM fuses it with; None computes the layer's own.

    Returns:
        The quantized weight and the buffers ``weight_scale``, ``weight_zero_point``,
        ``weight_global_scale`` for strategy ``tensor_group`` and, with static input
        activations, ``input_scale`` and ``input_zero_point``.

    Raises:
        RecipeError: when static input activations saw no calibration data.
        ValueError: naming the layer when strategy ``tensor_group`` meets a weight that is
            all zero or not finite.
    """
    weight = module.weight.detach()
    args = scheme.weights
    if shared_global_scale is not None and args.strategy == "tensor_group":
        tensor_scale = shared_global_scale.clone()  # each layer its own buffer
        scale, zero_point = qparams_for_weight(weight, args, global_scale=tensor_scale)
    else:
        where = f"layer '{name}' weight"
        scale, zero_point, tensor_scale = qparams_and_global_scale(weight, args, where)
    quantized = fake_quantize(weight, scale, zero_point, args, tensor_scale)
    layer = quantized_layer(quantized, scale, zero_point, observer)
    if tensor_scale is not None:
        layer.buffers["weight_global_scale"] = tensor_scale
    return layer


def relative_error(weight: Tensor, quantized: Tensor) -> float:
    """``||weight - quantized|| / ||weight||``, the error a layer's quantization makes.

    Args:
        weight: the weight before.
        quantized: after quantization.

    Returns:
        The relative error (0 for a zero weight quantized exactly).
    """
    with torch.no_grad():
        return float((weight - quantized).norm() / weight.norm().clamp_min(1e-12))
