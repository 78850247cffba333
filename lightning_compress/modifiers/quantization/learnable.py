"""Learnable weight scales for quantization-aware training (LSQ).

With ``learnable_scales: true`` each layer's weight scale is a parameter the optimizer trains,
instead of the min-max of the weight recomputed on every step. The fake quantization is
Learned Step Size Quantization (Esser et al., 2020)::

    w_hat = clamp(round(w / s), qmin, qmax) * s

with the rounding passed straight through, so the gradients are LSQ's:

* ``dw_hat / dw`` is 1 where ``w / s`` lies in ``[qmin, qmax]`` and 0 where it was clamped;
* ``dw_hat / ds`` is ``round(w / s) - w / s`` inside the range and ``qmin`` or ``qmax`` where
  it was clamped, times LSQ's gradient scale ``1 / sqrt(n * qmax)`` where ``n`` is the number of
  weights sharing the scale (the whole tensor, a row or a group, by strategy).

The grid the rounding uses is the format's (integers, fp8 or fp4 values), so every scheme with a
scale works. The scale itself is stored in the format's scale encoding, so the forward uses the
learned scale rounded as the export stores it, again passed straight through: the layer's dtype
for int and fp8 weights, fp8 e4m3 (times the weight's fixed global scale) for NVFP4, a power of
two for the MX formats (E8M0). For E8M0 the float scale is learned and rounded to the nearest
power of two in log2 space; it moves one power of two once the learned value crosses the
midpoint, which takes many small LSQ steps (so on MX formats learnable scales change little).
The rounded scale is written to ``weight_scale`` on every forward, so baking and export save
exactly the scale the training used.

Only symmetric weights are supported: a learned zero point is not (the modifier refuses
asymmetric weights with ``learnable_scales``).

The parameter (``parametrizations.weight.0.scale``, float32, positive: the forward clamps it
to the encoding's smallest positive scale) is created at ``initialize``, before the optimizer is
built, and initialised on the first training forward from the min-max scale of the weight as
it is then (after any earlier stage such as GPTQ changed it); a buffer records that, so a
resumed run keeps the learned values.

Under Adam the step a scale takes does not depend on its gradient's size, so at the weights'
learning rate a scale (often 1e-3 to 1e-2 for int4) moves by a large fraction of itself each
step; give the scales their own, smaller learning rate (e.g. a tenth of the scale size):
:func:`learned_scale_parameters` lists them for an optimizer parameter group.

A scale gets no gradient before ``start``, once ``freeze_observers`` is reached and after
``end`` (baking removes it). Under DDP those steps need ``find_unused_parameters=True``
(``strategy="ddp_find_unused_parameters_true"``); with ``start: 0`` and QAT running to the end
of training every scale has a gradient on every step and plain DDP works.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.formats.grids import round_to_fp8_e4m3
from lightning_compress.modifiers.quantization.ops import (
    _round_to_grid,
    quant_range,
    strategy_groups,
    ungroup,
)
from lightning_compress.modifiers.quantization.qat import WeightFakeQuantizer, weight_qparams

__all__ = [
    "LearnableWeightFakeQuantizer",
    "add_learnable_weight_fake_quantizer",
    "learned_scale_parameters",
    "lsq_fake_quantize",
    "round_scale",
]

_FP8_MAX = 448.0
_FP8_SMALLEST = 2.0**-9  # the smallest positive (subnormal) fp8 e4m3 value


def _straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    """``rounded``'s value (exactly: ``x - x`` is 0) with the gradient of ``x``."""
    return rounded.detach() + (x - x.detach())


def _grad_scale(x: Tensor, factor: float) -> Tensor:
    """``x``'s value (exactly) with its gradient times ``factor``."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


def round_scale(scale: Tensor, args: QuantizationArgs, dtype: torch.dtype) -> Tensor:
    """The scales the format stores for learned scales, without a gradient path.

    Args:
        scale: learned scales in stored units (for NVFP4 times the global scale); values
            below the encoding's smallest positive scale (an optimizer step may take a scale
            below zero) become that smallest scale.
        args: the weight's quantization arguments; ``scale_dtype`` picks the encoding.
        dtype: the dtype of the layer's ``weight_scale`` buffer (int and fp8 weights store
            their scale in it).

    Returns:
        The stored scales, in ``scale``'s dtype: ``scale`` in ``dtype`` (linear scales), in fp8
        e4m3 clamped to ``[2**-9, 448]`` (``float8_e4m3fn``), or the nearest power of two in
        log2 space, ``[2**-127, 2**127]`` (``uint8``, E8M0).

    Raises:
        ValueError: for a ``scale_dtype`` with no rounding here.
    """
    scale = _positive(scale.detach(), args, dtype)
    encoding = args.scale_dtype
    if encoding is None:
        return scale.to(dtype).to(scale.dtype)
    if encoding == "float8_e4m3fn":
        return round_to_fp8_e4m3(scale.clamp_max(_FP8_MAX))
    if encoding == "uint8":
        return torch.exp2(torch.log2(scale).round().clamp_max(127))
    raise ValueError(
        f"scale_dtype={encoding!r} has no learnable-scale rounding; expected None, "
        "'float8_e4m3fn' or 'uint8'"
    )


def _positive(scale: Tensor, args: QuantizationArgs, dtype: torch.dtype) -> Tensor:
    """``scale`` clamped to the smallest positive scale the encoding stores."""
    if args.scale_dtype == "float8_e4m3fn":
        smallest = _FP8_SMALLEST
    elif args.scale_dtype == "uint8":
        smallest = 2.0**-127
    else:
        smallest = torch.finfo(dtype).tiny
    return scale.clamp_min(smallest)


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    args: QuantizationArgs,
    global_scale: Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Fake-quantizes ``x`` with a learnable scale and LSQ's gradients (see the module).

    Args:
        x: the weight.
        scale: the learnable scales (stored units), of the strategy's qparams shape.
        args: symmetric quantization arguments.
        global_scale: the fixed per-tensor global scale of strategy ``tensor_group``, else
            None.
        scale_dtype: the dtype linear scales are stored in (default ``x``'s).

    Returns:
        ``(x_hat, stored)``: ``x_hat`` of ``x``'s shape and dtype, and the scales as the format
        stores them (what ``weight_scale`` must hold), detached.

    Raises:
        ValueError: when ``args`` is asymmetric or ``scale`` does not fit the strategy.
    """
    if not args.symmetric:
        raise ValueError("learnable scales need symmetric weights (symmetric: true)")
    groups = strategy_groups(x, args)
    if scale.shape != groups.shape[:-1]:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not fit strategy={args.strategy!r} on "
            f"a weight of shape {tuple(x.shape)}: expected {tuple(groups.shape[:-1])}"
        )
    qmin, qmax = quant_range(args)
    dtype = x.dtype if scale_dtype is None else scale_dtype
    positive = _positive(scale, args, dtype)
    scaled_grad = _grad_scale(positive, 1.0 / math.sqrt(groups.shape[-1] * qmax))
    stored = round_scale(positive, args, dtype)
    step = _straight_through(scaled_grad, stored)
    if global_scale is not None:
        step = step / global_scale
    step = step.unsqueeze(-1)
    clamped = (groups.to(step.dtype) / step).clamp(qmin, qmax)
    grid = _straight_through(clamped, _round_to_grid(clamped.detach().clone(), args))
    return ungroup(grid * step, x.shape, args).to(x.dtype), stored


class LearnableWeightFakeQuantizer(WeightFakeQuantizer):
    """A :class:`WeightFakeQuantizer` whose scale is a trained parameter (LSQ).

    While enabled the weight is fake-quantized by :func:`lsq_fake_quantize` with ``scale`` and
    the stored scale is written to the owner's ``weight_scale``; once ``frozen`` the scale gets
    no gradient (it stays as last learned).

    Args:
        owner: the layer whose ``weight`` is parametrized and which holds the qparam buffers.
        args: the weight's symmetric quantization arguments.

    Raises:
        ValueError: when ``args`` is asymmetric.
    """

    def __init__(self, owner: nn.Module, args: QuantizationArgs) -> None:
        if not args.symmetric:
            raise ValueError(
                f"learnable scales need symmetric weights; {type(owner).__name__} has "
                "symmetric: false (a learned zero point is not supported)"
            )
        super().__init__(owner, args)
        scale = owner.weight_scale.detach().float().clone()
        self.scale = nn.Parameter(scale)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=scale.device))

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantizes ``weight`` with the learned scale (see the class).

        Args:
            weight: the float weight.

        Returns:
            The fake-quantized weight, or ``weight`` itself while not enabled.
        """
        if not self.enabled:
            return weight
        owner = self.owner
        tensor_scale = owner._buffers.get("weight_global_scale")
        if not bool(self.initialized):
            with torch.no_grad():
                scale, _, tensor_scale_now = weight_qparams(weight, self.args)
                self.scale.copy_(scale)
                if tensor_scale is not None:
                    tensor_scale.copy_(tensor_scale_now)
                self.initialized.fill_(True)
        scale = self.scale.detach() if self.frozen else self.scale
        x_hat, stored = lsq_fake_quantize(
            weight, scale, self.args, tensor_scale, owner.weight_scale.dtype
        )
        with torch.no_grad():
            owner.weight_scale.copy_(stored)
        return x_hat


def add_learnable_weight_fake_quantizer(
    module: nn.Module, args: QuantizationArgs
) -> LearnableWeightFakeQuantizer:
    """Parametrizes ``module.weight`` with a (disabled) :class:`LearnableWeightFakeQuantizer`.

    ``module`` must already have ``weight_scale`` / ``weight_zero_point`` buffers. The scale
    parameter becomes a parameter of ``module`` (``parametrizations.weight.0.scale``), so an
    optimizer built afterwards trains it; baking removes it.

    Args:
        module: the layer.
        args: the weight's symmetric quantization arguments.

    Returns:
        The parametrization.

    Raises:
        ValueError: when ``args`` is asymmetric.
    """
    quantizer = LearnableWeightFakeQuantizer(module, args)
    parametrize.register_parametrization(module, "weight", quantizer)
    return quantizer


def learned_scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned scales of ``model``, e.g. for their own optimizer parameter group.

    Args:
        model: a model set up for quantization-aware training with ``learnable_scales``.

    Returns:
        Every :class:`LearnableWeightFakeQuantizer`'s ``scale``, in module order (empty when
        there is none).
    """
    quantizers = (m for m in model.modules() if isinstance(m, LearnableWeightFakeQuantizer))
    return [quantizer.scale for quantizer in quantizers]
