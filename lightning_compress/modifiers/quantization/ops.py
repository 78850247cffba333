"""Quantization math shared by fake quantization (QAT) and one-shot methods (RTN, GPTQ).

Conventions, as in compressed-tensors:

* The values and their rounding come from the arguments' format
  (:func:`~lightning_compress.modifiers.quantization.formats.format_of`): ``int`` values are
  signed, ``[-2**(b-1), 2**(b-1) - 1]``, asymmetric ones too; fp8 e4m3 values lie in
  ``[-448, 448]`` and round by casting to ``float8_e4m3fn``; fp4 e2m1 values lie in
  ``[-6, 6]`` and round to nearest, ties to even.
* ``q = clamp(round(x / scale + zero_point), qmin, qmax)`` and
  ``x_hat = (q - zero_point) * scale``. With a per-tensor ``global_scale`` (strategy
  ``tensor_group``, NVFP4) the stored scale is divided by it first:
  ``scale / global_scale`` is the scale used.
* Scale and zero-point shapes for an input ``x``, per strategy:
  ``tensor`` ``[1]``; ``channel`` ``[x.shape[0], 1]``; ``group`` and ``tensor_group``
  ``[*x.shape[:-1], x.shape[-1] // group_size]``; ``block`` (2-D ``x``, tiles of
  ``block_structure``, the last ones padded with zeros as compressed-tensors pads them)
  ``[ceil(rows / block_rows), ceil(columns / block_columns)]``; ``token``
  ``[*x.shape[:-1], 1]``.
* Scales take the dtype of the min/max they come from; zero points are
  ``int8`` for ``int`` and ``float8_e4m3fn`` (always 0) for ``float``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.formats import QuantFormat, format_of
from lightning_compress.modifiers.quantization.formats.scales import FP8_MAX, global_scale_for

SHORT_GROUP = 16
"""Groups of at most this many values take their largest magnitude by halves (see
``_largest_magnitude``) instead of from their minimum and maximum."""

__all__ = [
    "FP8_MAX",
    "calculate_qparams",
    "compute_dynamic_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_aligned",
    "fake_quantize_ste",
    "global_scale",
    "quant_range",
    "quantize",
    "quantized_dtype",
    "reduce_min_max",
    "strategy_groups",
    "ungroup",
]


def quant_range(args: QuantizationArgs) -> tuple[float, float]:
    """Returns ``(qmin, qmax)``, the range of quantized values.

    Args:
        args: the quantization arguments.

    Returns:
        ``(-2**(b-1), 2**(b-1) - 1)`` for ``int``, ``(-448, 448)`` for fp8, ``(-6, 6)`` for fp4.
    """
    return _format(args).grid.bounds(args.num_bits)


def _format(args: QuantizationArgs) -> QuantFormat:
    return format_of(args.type, args.num_bits, args.scale_dtype)


def quantized_dtype(args: QuantizationArgs) -> torch.dtype:
    """Returns the storage dtype of quantized values and zero points.

    Args:
        args: the quantization arguments.

    Returns:
        ``torch.int8`` for ``int`` (every width up to 8 bits), ``torch.float8_e4m3fn`` for fp8
        and fp4 (every fp4 value is exact in it).
    """
    return _format(args).grid.storage_dtype


def strategy_groups(x: Tensor, args: QuantizationArgs) -> Tensor:
    """Views ``x`` so that its last dimension holds exactly the values sharing one scale.

    Reducing the last dimension gives a tensor of the strategy's qparams shape
    (see the module docstring).

    Args:
        x: the tensor to quantize.
        args: the quantization arguments.

    Returns:
        ``x`` reshaped to ``[*qparams_shape, values_per_scale]``.

    Raises:
        ValueError: for ``group`` when ``group_size`` does not divide ``x.shape[-1]``, for
            ``block`` when ``x`` is not 2-D.
    """
    if args.strategy == "block":
        return _blocks(x, args.block_structure)
    if args.strategy == "tensor":
        return x.reshape(1, -1)
    if args.strategy == "channel":
        return x.reshape(x.shape[0], 1, -1)
    if args.strategy == "token":
        return x.unsqueeze(-2)
    group_size = args.group_size
    if x.shape[-1] % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the last dimension of shape "
            f"{tuple(x.shape)}; use a group_size that divides {x.shape[-1]} or add "
            "this module to `ignore`"
        )
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size))


def _blocks(x: Tensor, block_structure: tuple[int, int]) -> Tensor:
    """``x`` ``[rows, columns]`` as ``[ceil(rows / r), ceil(columns / c), r * c]``, each tile's
    values last; the tiles past the edges are padded with zeros, as compressed-tensors pads
    them (zeros change no tile's range, and quantize to zero)."""
    rows, columns = block_structure
    if x.dim() != 2:
        raise ValueError(
            f"block_structure={list(block_structure)} tiles 2-D tensors; got shape "
            f"{tuple(x.shape)}: add this module to `ignore`"
        )
    padded = _padded_shape(x.shape, block_structure)
    if padded != x.shape:
        whole = x.new_zeros(padded)
        whole[: x.shape[0], : x.shape[1]] = x
        x = whole
    tiles = x.reshape(padded[0] // rows, rows, padded[1] // columns, columns).transpose(1, 2)
    return tiles.reshape(*tiles.shape[:2], rows * columns)


def _padded_shape(shape: torch.Size, block_structure: tuple[int, int]) -> torch.Size:
    """``shape`` rounded up to whole tiles of ``block_structure``."""
    return torch.Size(
        -(-size // block) * block for size, block in zip(shape, block_structure, strict=True)
    )


def ungroup(groups: Tensor, shape: torch.Size, args: QuantizationArgs) -> Tensor:
    """Inverts :func:`strategy_groups`.

    Args:
        groups: values laid out as :func:`strategy_groups` lays out a tensor of ``shape``.
        shape: the shape of that tensor.
        args: the quantization arguments that grouped it.

    Returns:
        The values at their places in a tensor of ``shape``.
    """
    if args.strategy != "block":
        return groups.reshape(shape)
    rows, columns = args.block_structure
    tiles = groups.reshape(*groups.shape[:2], rows, columns).transpose(1, 2)
    whole = tiles.reshape(_padded_shape(shape, args.block_structure))
    return whole if whole.shape == shape else whole[: shape[0], : shape[1]].contiguous()


def reduce_min_max(x: Tensor, args: QuantizationArgs) -> tuple[Tensor, Tensor]:
    """Returns the minimum and maximum of each group of values sharing a scale.

    Args:
        x: the tensor to observe.
        args: the quantization arguments; their strategy picks the groups.

    Returns:
        ``(min_vals, max_vals)``, each of the strategy's qparams shape.
    """
    return _min_max(strategy_groups(x, args))


def _min_max(groups: Tensor) -> tuple[Tensor, Tensor]:
    """The minimum and maximum over the last dimension."""
    # Two reductions: on CPU, aminmax over a dimension is many times slower than both.
    return groups.amin(dim=-1), groups.amax(dim=-1)


def _max_abs(groups: Tensor) -> Tensor:
    """The largest magnitude over the last dimension (0 for no value above it): by halves for
    short groups, else from the minimum and maximum (two reductions, fast for long ones)."""
    if groups.shape[-1] <= SHORT_GROUP:
        return _largest_magnitude(groups)
    min_vals, max_vals = _min_max(groups)
    return torch.maximum(-min_vals.clamp(max=0), max_vals.clamp(min=0))


def _largest_magnitude(groups: Tensor) -> Tensor:
    """``groups.abs().amax(dim=-1)``, by halves: on the CPU a reduction over a last dimension
    of a few values is several times slower than elementwise maxima of its halves (groups of
    16: about 2x faster than ``amin`` and ``amax``). A maximum does not round: the same
    values, NaN included."""
    values = groups.abs()
    while values.shape[-1] > 1:
        half = values.shape[-1] // 2
        top = torch.maximum(values[..., :half], values[..., half : 2 * half])
        if values.shape[-1] % 2:
            top[..., :1] = torch.maximum(top[..., :1], values[..., -1:])
        values = top
    return values.squeeze(-1)


def calculate_qparams(
    min_vals: Tensor,
    max_vals: Tensor,
    args: QuantizationArgs,
    global_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Turns observed ranges into scales and zero points.

    The range is first widened to include 0. Symmetric: the format's scale encoding of
    ``max(|min|, |max|)``: for int and fp8 ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``
    (``/ 127.5`` for int8, ``/ 448`` for fp8); NVFP4 multiplies that by ``global_scale`` and
    rounds it to fp8 e4m3; the MX formats round it to a power of two
    (:mod:`~lightning_compress.modifiers.quantization.formats.scales`); ``zero_point = 0``.
    Asymmetric: ``scale = (max - min) / (qmax - qmin)`` and
    ``zero_point = clamp(round(qmin - min / scale), qmin, qmax)``.
    A zero scale becomes ``finfo(scale.dtype).eps`` (0.125 for fp8 scales).

    Args:
        min_vals: minima, any shape (0-d becomes ``[1]``).
        max_vals: maxima, same shape.
        args: the quantization arguments.
        global_scale: the per-tensor global scale (:func:`global_scale`) of strategy
            ``tensor_group``; None otherwise.

    Returns:
        ``(scale, zero_point)``: scale in the dtype of ``min_vals``, zero point in
        :func:`quantized_dtype`.
    """
    min_vals = min_vals.clamp(max=0)
    max_vals = max_vals.clamp(min=0)
    if args.symmetric:
        return _symmetric_qparams(torch.maximum(-min_vals, max_vals), args, global_scale)
    qmin, qmax = quant_range(args)
    scale = _nonzero((max_vals - min_vals) / (qmax - qmin))
    zero_point = (qmin - min_vals / scale).round().clamp(qmin, qmax)
    return torch.atleast_1d(scale), torch.atleast_1d(zero_point.to(quantized_dtype(args)))


def _symmetric_qparams(
    max_abs: Tensor, args: QuantizationArgs, global_scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`calculate_qparams` of symmetric arguments from each group's largest magnitude."""
    qmin, qmax = quant_range(args)
    scale = _format(args).scale.scale(max_abs, (qmax - qmin) / 2, global_scale)
    zero_point = torch.zeros_like(scale)
    return torch.atleast_1d(scale), torch.atleast_1d(zero_point.to(quantized_dtype(args)))


def _nonzero(scale: Tensor) -> Tensor:
    return torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)


def global_scale(x: Tensor, args: QuantizationArgs, name: str) -> Tensor:
    """The per-tensor global scale of strategy ``tensor_group`` (NVFP4):
    ``448 * qmax / max|x|`` over the whole tensor.

    Args:
        x: the tensor, e.g. a weight.
        args: the quantization arguments, of strategy ``tensor_group``.
        name: what the tensor is (e.g. ``"layer 'q_proj' weight"``), for the error.

    Returns:
        The global scale, float32 of shape ``[1]``.

    Raises:
        ValueError: naming the tensor when it is all zero or not finite.
    """
    max_abs = _max_abs(strategy_groups(x.detach(), args))
    return global_scale_for(max_abs, quant_range(args)[1], name)


def compute_dynamic_qparams(
    x: Tensor, args: QuantizationArgs, global_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Computes scales and zero points from ``x`` itself, as dynamic activations do.

    Args:
        x: the activation; no gradient flows through the result.
        args: the quantization arguments, usually ``token`` or ``tensor`` strategy;
            ``tensor_group`` for ``dynamic: local`` (NVFP4) activations.
        global_scale: the calibrated per-tensor global scale the group scales of
            ``tensor_group`` are stored times; required by and only allowed with it.

    Returns:
        ``(scale, zero_point)`` of the strategy's qparams shape.

    Raises:
        ValueError: for strategy ``tensor_group`` without a global scale, or a global scale
            with another strategy.
    """
    if (args.strategy == "tensor_group") != (global_scale is not None):
        raise ValueError(
            "strategy='tensor_group' (NVFP4) stores its group scales times a calibrated "
            "per-tensor global scale, so its dynamic qparams need one (dynamic: local), and "
            f"only it takes one; got strategy={args.strategy!r} with global_scale="
            f"{global_scale!r}"
        )
    groups = strategy_groups(x.detach(), args)
    if args.symmetric:
        return _symmetric_qparams(_max_abs(groups), args, global_scale)
    return calculate_qparams(*_min_max(groups), args, global_scale)


def _unscaled(scale: Tensor, global_scale: Tensor | None) -> Tensor:
    """The scale to use: ``scale / global_scale`` (in float32, as compressed-tensors divides)
    when there is a global scale, else ``scale``."""
    return scale if global_scale is None else scale / global_scale


def _groups_and_qparams(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, args: QuantizationArgs
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Groups ``x`` and shapes ``scale`` and ``zero_point`` to broadcast against the groups.

    Raises:
        ValueError: when a qparam's shape does not broadcast to the strategy's shape.
    """
    groups = strategy_groups(x, args)
    expected = groups.shape[:-1]
    for name, qparam in (("scale", scale), ("zero_point", zero_point)):
        if qparam is not None and not _broadcasts_to(qparam.shape, expected):
            raise ValueError(
                f"{name} of shape {tuple(qparam.shape)} does not fit strategy="
                f"{args.strategy!r} on input of shape {tuple(x.shape)}: expected "
                f"{tuple(expected)}"
            )
    return groups, scale.unsqueeze(-1), None if zero_point is None else zero_point.unsqueeze(-1)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    if shape == target:  # the usual case, without broadcast_shapes' checks (slow in Python)
        return True
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _scale_to_grid(
    groups: Tensor, scale: Tensor, zero_point: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """Returns ``groups / scale + zero_point`` in ``out`` (None: a new tensor; zero point
    None: zero points of 0)."""
    scaled = torch.div(groups, scale, out=out)
    return scaled if zero_point is None else scaled.add_(zero_point.to(scaled.dtype))


def _round_to_grid(clamped: Tensor, args: QuantizationArgs) -> Tensor:
    """Rounds values already clamped to :func:`quant_range`; in place for ``int`` and fp4."""
    return _format(args).grid.round_(clamped)


def _from_grid(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """Returns ``(q - zero_point) * scale``; in place when ``q`` has ``scale``'s dtype."""
    x_hat = q if q.dtype == scale.dtype else q.to(scale.dtype)
    if zero_point is not None:
        x_hat.sub_(zero_point.to(scale.dtype))
    return x_hat.mul_(scale)


def _round_trip(
    clamped: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    args: QuantizationArgs,
    like: Tensor,
) -> Tensor:
    """Rounds clamped grid values and maps them back to the shape and dtype of ``like``.

    ``clamped`` must be a temporary: it is changed in place.
    """
    x_hat = _from_grid(_round_to_grid(clamped, args), scale, zero_point)
    if x_hat.shape == like.shape:  # ``like`` is grouped already (fake_quantize_aligned)
        # skips a no-op call: this runs once per column in GPTQ's sweep
        return x_hat if x_hat.dtype == like.dtype else x_hat.to(like.dtype)
    return ungroup(x_hat, like.shape, args).to(like.dtype)


def quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    args: QuantizationArgs,
    global_scale: Tensor | None = None,
) -> Tensor:
    """Quantizes ``x`` to integer (or fp8) values, clamped to :func:`quant_range`.

    Args:
        x: the tensor.
        scale: scales of the strategy's qparams shape (or broadcastable to it).
        zero_point: zero points, same shape rules; None for zero points that are all 0
            (symmetric qparams): the same values, one operation fewer.
        args: the quantization arguments.
        global_scale: the per-tensor global scale ``scale`` is stored times
            (``tensor_group``), else None.

    Returns:
        ``q`` of ``x``'s shape in :func:`quantized_dtype` (``int8`` holds every int width).

    Raises:
        ValueError: when a shape does not fit the strategy.
    """
    scale = _unscaled(scale, global_scale)
    groups, scale, zero_point = _groups_and_qparams(x, scale, zero_point, args)
    scaled = _scale_to_grid(groups, scale, zero_point)
    q = _round_to_grid(scaled.clamp_(*quant_range(args)), args)
    return ungroup(q, x.shape, args).to(quantized_dtype(args))


def dequantize(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    args: QuantizationArgs,
    global_scale: Tensor | None = None,
) -> Tensor:
    """Maps quantized values back: ``(q - zero_point) * scale``.

    Args:
        q: quantized values, as :func:`quantize` returns them.
        scale: the scales used to quantize.
        zero_point: the zero points used to quantize; None for zero points that are all 0.
        args: the quantization arguments.
        global_scale: as :func:`quantize`.

    Returns:
        The dequantized tensor, of ``q``'s shape in ``scale``'s dtype (float32 with a
        ``global_scale``).

    Raises:
        ValueError: when a shape does not fit the strategy.
    """
    scale = _unscaled(scale, global_scale)
    groups, scale, zero_point = _groups_and_qparams(q, scale, zero_point, args)
    return ungroup(_from_grid(groups.to(scale.dtype, copy=True), scale, zero_point), q.shape, args)


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    args: QuantizationArgs,
    global_scale: Tensor | None = None,
) -> Tensor:
    """Quantizes then dequantizes ``x``.

    Rounding has a zero gradient almost everywhere; train with :func:`fake_quantize_ste`.

    Args:
        x: the tensor.
        scale: scales of the strategy's qparams shape.
        zero_point: zero points of the same shape.
        args: the quantization arguments.
        global_scale: as :func:`quantize`.

    Returns:
        ``x_hat`` of ``x``'s shape and dtype.

    Raises:
        ValueError: when a shape does not fit the strategy.
    """
    scale = _unscaled(scale, global_scale)
    groups, scale, zero_point = _groups_and_qparams(x, scale, zero_point, args)
    return ungroup(fake_quantize_aligned(groups, scale, zero_point, args), x.shape, args)


def fake_quantize_aligned(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    args: QuantizationArgs,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`fake_quantize` for qparams already shaped to broadcast against ``x``.

    No grouping and no shape checks: the per-column loop of GPTQ calls it with a column
    ``[out]`` and per-row qparams ``[out]``. Same arithmetic, so the same results.

    Args:
        x: the values.
        scale: scales broadcastable to ``x``.
        zero_point: zero points broadcastable to ``x``; None for zero points that are all 0
            (symmetric qparams): the same values, two operations fewer.
        args: the quantization arguments.
        out: where to compute, of ``x``'s shape and of ``scale``'s dtype (``x`` itself
            computes in place); None: a new tensor.

    Returns:
        ``x_hat`` of ``x``'s shape and dtype (``out`` when given).
    """
    scaled = _scale_to_grid(x, scale, zero_point, out)
    return _round_trip(scaled.clamp_(*quant_range(args)), scale, zero_point, args, x)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization whose gradient passes through where ``x`` was not clamped."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, args: QuantizationArgs
    ) -> Tensor:
        groups, scale, zero_point = _groups_and_qparams(x, scale, zero_point, args)
        scaled = _scale_to_grid(groups, scale, zero_point)
        clamped = scaled.clamp(*quant_range(args))
        # 1 where not clamped, in x's dtype: multiplying by it is far faster than a bool mask.
        inside = torch.empty(scaled.shape, dtype=x.dtype, device=x.device)
        ctx.save_for_backward(ungroup(torch.eq(clamped, scaled, out=inside), x.shape, args))
        return _round_trip(clamped, scale, zero_point, args, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_ste(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    args: QuantizationArgs,
    global_scale: Tensor | None = None,
) -> Tensor:
    """Fake quantization for training, with a straight-through gradient.

    The forward pass equals :func:`fake_quantize`. The gradient with respect to
    ``x`` is 1 where ``x / scale + zero_point`` lies in ``[qmin, qmax]`` and 0
    where it was clamped; ``scale`` and ``zero_point`` get no gradient.

    Args:
        x: the tensor.
        scale: scales of the strategy's qparams shape.
        zero_point: zero points of the same shape.
        args: the quantization arguments.
        global_scale: as :func:`quantize`.

    Returns:
        ``x_hat`` of ``x``'s shape and dtype.

    Raises:
        ValueError: when a shape does not fit the strategy.
    """
    return _FakeQuantizeSTE.apply(x, _unscaled(scale, global_scale), zero_point, args)
