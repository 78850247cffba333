"""GPTQ (Frantar et al. 2022): quantize a weight column by column, correcting later columns.

Pure tensor math: a weight ``[out, in]`` (``nn.Linear`` layout; transpose ``Conv1D``
weights first) and the Hessian of its inputs go in, the quantized weight and its qparams
come out. Every rounding goes through :mod:`~lightning_compress.modifiers.quantization.ops`.

Activation ordering (``actorder``), as compressed-tensors' ``ActivationOrdering`` defines it:

* ``None`` / ``"none"``: columns in their natural order. With ``strategy="group"`` each
  group's qparams are computed when the sweep enters the group, from its current
  (already error-corrected) columns, as in GPTQ's reference implementation.
* ``"weight"`` (alias ``"static"``): columns are visited by decreasing ``diag(H)``, but
  the groups stay the natural runs of ``group_size`` columns, so the format is unchanged
  (no ``g_idx`` needed at inference). Their qparams are computed up front from the
  weight, since a group's columns are no longer visited together.
* ``"group"`` (alias ``"dynamic"``): columns are visited by decreasing ``diag(H)`` and the
  groups are runs of ``group_size`` columns in that order (qparams computed on entering
  each group, as for ``None``). The weight is returned in its original column order and
  ``g_idx`` maps each column to its group; inference must use ``g_idx``. Needs
  ``strategy="group"``.

compressed-tensors defines ``static`` and ``dynamic`` as aliases of ``weight`` and ``group``,
so they give identical results here.

Pruned weights: a ``keep`` mask (see :func:`weights_to_keep`) marks the weights GPTQ may
change; the others are quantized to 0, so a pruned layer keeps its mask.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lightning_compress.modifiers.hessian import BlockwiseOBS
from lightning_compress.modifiers.quantization.args import GROUPED_STRATEGIES, QuantizationArgs
from lightning_compress.modifiers.quantization.observers import qparams_for_weight
from lightning_compress.modifiers.quantization.ops import fake_quantize_aligned, global_scale

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ACTORDER_ALIASES",
    "ACTORDERS",
    "ColumnQuantizer",
    "GPTQResult",
    "gptq_quantize",
    "make_column_quantizer",
    "normalize_actorder",
    "weights_to_keep",
]

ACTORDERS = ("weight", "group")
ACTORDER_ALIASES = {"none": None, "static": "weight", "dynamic": "group"}
PRUNED_ZERO_FRACTION = 0.1
"""``preserve_zeros="auto"`` keeps the zeros of a layer with at least this fraction of exact
zeros. Float weights of a dense model hold almost none (SmolLM2-135M dequantized from a Q4_1
GGUF file: 0.04%), a pruned layer holds its sparsity (50% for 2:4)."""


class GPTQResult(NamedTuple):
    """What :func:`gptq_quantize` returns."""

    weight_q: Tensor
    """Dequantized weight ``[out, in]``, original column order, the input's dtype."""
    scale: Tensor
    """``[1]`` (tensor), ``[out, 1]`` (channel) or ``[out, in / group_size]`` (group)."""
    zero_point: Tensor
    """Same shape as ``scale``, in ``quantized_dtype(args)``."""
    g_idx: Tensor | None
    """Group strategy only: int32 ``[in]``, the group (scale column) of each input column.
    It is ``arange(in) // group_size`` except for ``actorder="group"``; only that one needs
    saving (compressed-tensors' ``weight_g_idx``)."""
    loss: float
    """GPTQ objective ``sum((w - q)^2 / d^2) / 2``: see :meth:`BlockwiseOBS.run`."""
    row_losses: Tensor
    """``[out]``: each row's share of ``loss`` (rows are quantized independently)."""
    dampening_used: float
    """The dampening fraction that made ``H`` invertible (see ``damp_and_factor``)."""
    global_scale: Tensor | None = None
    """Strategy ``tensor_group`` only: the per-tensor global scale ``scale`` is stored times
    (one for all the rows of a stacked call)."""


def weights_to_keep(weight: Tensor, preserve_zeros: bool | str = "auto") -> Tensor | None:
    """The pruning mask GPTQ keeps: True for a weight it quantizes, False for a zero that stays.

    Args:
        weight: one layer's whole weight (decide per layer, not per row slice or stack).
        preserve_zeros: True keeps every exact zero (a pruning mask); False sets them all
            free (GPTQ quantizes them like any weight); ``"auto"`` keeps them only when at
            least :data:`PRUNED_ZERO_FRACTION` of the weight is zero, i.e. when the layer
            was pruned rather than holding a dense model's accidental zeros.

    Returns:
        A bool mask shaped like ``weight``, or None when no zero is kept.

    Raises:
        ValueError: when ``preserve_zeros`` is not True, False or ``"auto"``.
    """
    if not (isinstance(preserve_zeros, bool) or preserve_zeros == "auto"):
        raise ValueError(
            f"preserve_zeros={preserve_zeros!r} is invalid: expected True, False or 'auto'"
        )
    if preserve_zeros is False:
        return None
    count = weight.numel() - int(torch.count_nonzero(weight))  # no mask for a dense layer
    if count == 0 or (preserve_zeros == "auto" and count < PRUNED_ZERO_FRACTION * weight.numel()):
        return None
    return weight != 0


def normalize_actorder(actorder: str | None) -> str | None:
    """Maps an activation-ordering name to ``None``, ``"weight"`` or ``"group"``.

    Args:
        actorder: ``None``, ``"none"``, ``"weight"``, ``"static"``, ``"group"`` or
            ``"dynamic"`` (any case).

    Returns:
        The canonical name, or None for the natural order.

    Raises:
        ValueError: for any other value.
    """
    if actorder is None:
        return None
    name = str(actorder).lower()
    if name in ACTORDERS:
        return name
    if name in ACTORDER_ALIASES:
        return ACTORDER_ALIASES[name]
    raise ValueError(
        f"actorder={actorder!r} is invalid: expected None or one of "
        f"{[*ACTORDERS, *ACTORDER_ALIASES]}"
    )


class ColumnQuantizer:
    """Quantizes one column at a time for :class:`BlockwiseOBS`, and keeps the qparams.

    Qparams are either fixed up front (``column_group`` given: column position ``j`` uses
    qparams ``column_group[j]``) or, for the group strategy, computed on entering each run
    of ``group_size`` positions from the sweep's current values. Scales are rounded to the
    output dtype when computed, so ``fake_quantize(weight_q, scale, zero_point)`` gives
    ``weight_q`` back exactly.

    Use :func:`make_column_quantizer` to build one.

    Args:
        args: the weight's quantization arguments.
        out_dtype: the dtype the weight and the scales are returned in.
        column_group: the qparams index of each column position; None computes group
            qparams on entry.
        scales: the fixed scales, one ``[out, 1]`` (or ``[1]``) per index.
        zero_points: the matching zero points.
        global_scale: the global scale the scales are stored times (``tensor_group``).
    """

    def __init__(
        self,
        args: QuantizationArgs,
        out_dtype: torch.dtype,
        column_group: Sequence[int] | None = None,
        scales: Sequence[Tensor] = (),
        zero_points: Sequence[Tensor] = (),
        global_scale: Tensor | None = None,
    ) -> None:
        self.args = args
        self.out_dtype = out_dtype
        self.column_group = column_group
        self.scales = list(scales)
        self.zero_points = list(zero_points)
        self.global_scale = global_scale
        self.keep: Tensor | None = None
        # qparams of the columns of one group, one per row: a group's own arguments (formats
        # that exist only in groups, as MXFP4, keep theirs), else per channel
        self._column_args = (
            args
            if args.strategy in GROUPED_STRATEGIES
            else dataclasses.replace(
                args, strategy="channel", group_size=None, block_structure=None
            )
        )
        self._aligned: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, j: int, w: Tensor, sweep: BlockwiseOBS) -> Tensor:
        """Returns column ``j`` (current value ``w`` ``[out]``, a buffer this overwrites)
        quantized, in ``w``.

        Where :attr:`keep` is set (``[in, out]``: row ``j`` for column ``j`` in sweep order,
        in the weight's dtype), entries it marks 0 are returned as 0: a pruned weight stays
        pruned.
        """
        if self.column_group is None:
            group, offset = divmod(j, self.args.group_size)
            if offset == 0:
                self._enter_group(sweep.current(j, j + self.args.group_size))
        else:
            group = self.column_group[j]
        scale, zero_point = self._aligned_qparams(group, w)
        q = fake_quantize_aligned(w, scale, zero_point, self._column_args, out=w)
        return q if self.keep is None else q.mul_(self.keep[j])

    def _aligned_qparams(self, group: int, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """The qparams of ``group`` flattened to ``[out]`` (or ``[1]``) in ``w``'s dtype; the
        zero point is None when it is all 0."""
        if group not in self._aligned:
            scale = self.scales[group].reshape(-1).to(w.dtype)
            if self.global_scale is not None:  # the scale used, as fake_quantize divides
                scale = scale / self.global_scale
            zero_point = self.zero_points[group].reshape(-1).to(w.dtype)
            self._aligned[group] = (scale, zero_point if zero_point.any() else None)
        return self._aligned[group]

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Returns ``(scale, zero_point)`` in the strategy's shape; scale in ``out_dtype``."""
        scale, zero_point = torch.cat(self.scales, dim=-1), torch.cat(self.zero_points, dim=-1)
        if self.args.strategy == "block":  # rows of a tile share its scales: one row per tile
            rows = self.args.block_structure[0]
            scale, zero_point = scale[::rows], zero_point[::rows]
        return scale.to(self.out_dtype), zero_point

    def _enter_group(self, columns: Tensor) -> None:
        """Appends the qparams of the next group, computed from its current columns."""
        scale, zero_point = _rounded_qparams(
            columns, self._column_args, self.out_dtype, self.global_scale
        )
        self.scales.append(scale)
        self.zero_points.append(zero_point)


def _rounded_qparams(
    weight: Tensor,
    args: QuantizationArgs,
    out_dtype: torch.dtype,
    global_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Computes qparams with ``args``' observer, the scale rounded to ``out_dtype``.

    Args:
        weight: the values observed.
        args: the quantization arguments.
        out_dtype: the dtype the scale will be stored in.
        global_scale: the global scale of strategy ``tensor_group``, else None.

    Returns:
        ``(scale, zero_point)``; the scale keeps ``weight``'s dtype.
    """
    scale, zero_point = qparams_for_weight(weight, args, global_scale=global_scale)
    return scale.to(out_dtype).to(weight.dtype), zero_point


def make_column_quantizer(
    weight: Tensor,
    args: QuantizationArgs,
    out_dtype: torch.dtype,
    actorder: str | None = None,
    perm: Tensor | None = None,
    global_scale: Tensor | None = None,
) -> ColumnQuantizer:
    """Builds the column quantizer for a sweep over ``weight[:, perm]``.

    Args:
        weight: the weight in natural column order (dead columns already zeroed).
        args: the weight's quantization arguments (``tensor``, ``channel`` or ``group``).
        out_dtype: the dtype the weight and scales are returned in.
        actorder: canonical activation ordering (see :func:`normalize_actorder`).
        perm: the column order of the sweep; None is the natural order.
        global_scale: the weight's global scale, required by and only used with
            ``tensor_group``.

    Returns:
        The quantizer.

    Raises:
        ValueError: for strategies or settings GPTQ cannot quantize (the message says why).
    """
    _check_args(weight.shape[1], args, actorder)
    order = torch.arange(weight.shape[1]) if perm is None else perm.cpu()
    if args.strategy == "block":  # each tile's qparams fixed up front, repeated over its rows
        rows, columns = args.block_structure
        scale, zero_point = _rounded_qparams(weight, args, out_dtype)
        height = weight.shape[0]  # the last tiles may be padded past the weight's rows
        return ColumnQuantizer(
            args,
            out_dtype,
            (order // columns).tolist(),
            scale.repeat_interleave(rows, dim=0)[:height].split(1, dim=1),
            zero_point.repeat_interleave(rows, dim=0)[:height].split(1, dim=1),
        )
    if args.strategy in GROUPED_STRATEGIES and actorder != "weight":
        return ColumnQuantizer(args, out_dtype, global_scale=global_scale)
    scale, zero_point = _rounded_qparams(weight, args, out_dtype, global_scale)
    if args.strategy not in GROUPED_STRATEGIES:
        return ColumnQuantizer(args, out_dtype, [0] * weight.shape[1], [scale], [zero_point])
    return ColumnQuantizer(
        args,
        out_dtype,
        (order // args.group_size).tolist(),
        scale.split(1, dim=1),
        zero_point.split(1, dim=1),
        global_scale,
    )


def _check_args(in_features: int, args: QuantizationArgs, actorder: str | None) -> None:
    if args.dynamic or args.strategy == "token":
        raise ValueError(
            f"GPTQ computes static weight qparams: got strategy={args.strategy!r}, "
            f"dynamic={args.dynamic!r}; use 'tensor', 'channel' or 'group' with dynamic=False"
        )
    if actorder == "group" and args.strategy != "group":
        raise ValueError(
            f"actorder='group' needs strategy='group', got strategy={args.strategy!r}; "
            "use actorder='weight' to reorder the columns without changing the groups"
        )
    if args.strategy in GROUPED_STRATEGIES and in_features % args.group_size:
        raise ValueError(
            f"group_size={args.group_size} does not divide in_features={in_features}; "
            f"use a group_size that divides {in_features} or add this layer to `ignore`"
        )


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    args: QuantizationArgs,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: str | None = None,
    keep: Tensor | None = None,
    consume_hessian: bool = False,
) -> GPTQResult:
    """Quantizes a weight with GPTQ.

    Args:
        weight: ``[out, in]`` in ``nn.Linear`` layout (not modified).
        hessian: ``H = 2/n X^T X`` ``[in, in]`` of the layer's inputs (not modified unless
            ``consume_hessian``).
        args: the weight's quantization arguments: ``tensor``, ``channel`` or ``group``.
        block_size: columns per lazy batch update.
        dampening_frac: dampening as a fraction of the mean diagonal of ``H``.
        actorder: activation ordering, see the module docstring.
        keep: bool ``[out, in]``: weights marked False are quantized to 0 (a pruned weight
            stays pruned), their rounding error spread onto the later columns like any
            other; None lets GPTQ set every weight (see :func:`weights_to_keep`).
        consume_hessian: whether ``hessian`` was made for this call, so that its buffer may
            hold the damped (and reordered) factor the sweep needs instead of a copy.

    Rows are independent: layers that share ``H`` and ``args`` (other than
    ``strategy="tensor"``) can be stacked into one call.

    Returns:
        The quantized weight, its qparams, ``g_idx``, the loss and the dampening used.

    Raises:
        ValueError: on shapes, strategies or settings GPTQ cannot handle.
        SingularHessianError: when no dampening makes ``H`` invertible.
    """
    actorder = normalize_actorder(actorder)
    _check_args(weight.shape[-1], args, actorder)
    if actorder is None:
        sweep = BlockwiseOBS(weight, hessian, block_size, dampening_frac, consume_hessian)
        perm = inverse = None
        natural = sweep.weight
    else:
        hessian = hessian.to(weight.device)
        perm = torch.argsort(hessian.diagonal(), descending=True, stable=True)
        inverse = torch.argsort(perm)
        sweep = BlockwiseOBS(
            weight, hessian, block_size, dampening_frac, consume_hessian, order=perm
        )
        natural = _gather_columns(sweep.weight, inverse)
    tensor_scale = None
    if args.strategy == "tensor_group":
        tensor_scale = global_scale(weight, args, "the weight")
    quantizer = make_column_quantizer(natural, args, weight.dtype, actorder, perm, tensor_scale)
    if keep is not None:
        if keep.shape != weight.shape:
            raise ValueError(
                f"keep has shape {list(keep.shape)}; expected the weight's {list(weight.shape)}"
            )
        kept = keep.to(sweep.weight.device, sweep.weight.dtype)
        quantizer.keep = (kept if perm is None else kept.index_select(1, perm)).T.contiguous()
    weight_q, loss = sweep.run(quantizer)
    if inverse is not None:
        weight_q = _gather_columns(weight_q, inverse)
    scale, zero_point = quantizer.qparams()
    return GPTQResult(
        weight_q.to(weight.dtype),
        scale,
        zero_point,
        _g_idx(weight, args, actorder, inverse),
        loss,
        sweep.row_losses,
        sweep.dampening_frac,
        tensor_scale,
    )


def _gather_columns(weight: Tensor, order: Tensor) -> Tensor:
    """``weight.index_select(1, order)`` for a weight stored column by column (the sweep's
    layout): its rows gathered, then one blocked transpose (2x faster than gathering columns
    across it).

    Args:
        weight: ``[out, in]`` whose transpose is contiguous.
        order: the columns to take.

    Returns:
        A contiguous ``[out, len(order)]``.
    """
    return weight.T.index_select(0, order).T.contiguous()


def _g_idx(
    weight: Tensor, args: QuantizationArgs, actorder: str | None, inverse: Tensor | None
) -> Tensor | None:
    """Group of each input column: groups follow the sweep order only for ``"group"``."""
    if args.strategy != "group":
        return None
    if actorder == "group":
        position = inverse
    else:
        position = torch.arange(weight.shape[1], device=weight.device)
    return (position // args.group_size).to(torch.int32)
