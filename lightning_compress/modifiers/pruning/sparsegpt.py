"""SparseGPT (Frantar & Alistarh 2023): prune a weight column by column, correcting later columns.

Pure tensor math on a weight ``[out, in]`` (``nn.Linear`` layout; transpose ``Conv1D``
weights first) and the Hessian of its inputs. The mask is chosen by the OBS saliency
``w^2 / d^2``, ``d`` the diagonal of the upper Cholesky factor of ``H^-1``, on the current
(already error-corrected) weights:

* unstructured: when the sweep enters a block of ``block_size`` columns, the lowest
  ``sparsity`` fraction of the block's saliencies (all rows together) is pruned
  ("adaptive mask selection", the paper's Algorithm 1);
* N:M: when the sweep enters a run of ``m`` columns, each row keeps its ``n`` most
  salient weights.

Selection uses :func:`~lightning_compress.modifiers.pruning.masks.unstructured_mask` and
:func:`~lightning_compress.modifiers.pruning.masks.nm_mask`, so it prunes exactly
``round(sparsity * numel)`` per block and breaks ties by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_compress.modifiers.hessian import BlockwiseOBS
from lightning_compress.modifiers.pruning.masks import nm_mask_of_run, unstructured_mask
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.gptq import ColumnQuantizer, make_column_quantizer

__all__ = ["SparseGPTResult", "sparsegpt_prune"]


class SparseGPTResult(NamedTuple):
    """What :func:`sparsegpt_prune` returns; starts like ``(weight, mask, loss)``."""

    weight: Tensor
    """Pruned (and, with ``quantize_args``, dequantized) weight ``[out, in]``, input dtype."""
    mask: Tensor
    """Bool ``[out, in]``: True keeps a weight, False marks a pruned one."""
    loss: float
    """OBS objective ``sum((w - q)^2 / d^2) / 2``: see ``BlockwiseOBS.run``."""
    scale: Tensor | None
    """With ``quantize_args``: the scales (as ``GPTQResult.scale``); else None."""
    zero_point: Tensor | None
    """With ``quantize_args``: the zero points; else None."""
    dampening_used: float
    """The dampening fraction that made ``H`` invertible (see ``damp_and_factor``)."""
    row_losses: Tensor
    """``[out]``: each row's share of ``loss``."""


class _ColumnPruner:
    """Chooses the mask as the sweep reaches each block (or N:M run), then zeroes pruned weights.

    The mask is kept in the sweep's column-major layout (row ``j`` is column ``j``), as 1 / 0
    in the weight's dtype: zeroing a column is one product.

    Args:
        weight: the sweep's working weight, for the mask's shape, dtype and device.
        sparsity: the unstructured fraction to prune.
        mask_structure: ``(n, m)`` to keep ``n`` of every ``m`` columns, or None.
        quantizer: quantizes the kept weights after pruning, or None.
        row_groups: the row counts of stacked weights (unstructured masks are chosen per
            group), or None for one weight.
        zeros: bool ``[out, in]``, weights that stay pruned whatever their saliency (the
            existing mask), or None.
    """

    def __init__(
        self,
        weight: Tensor,
        sparsity: float,
        mask_structure: tuple[int, int] | None,
        quantizer: ColumnQuantizer | None,
        row_groups: Sequence[int] | None = None,
        zeros: Tensor | None = None,
    ) -> None:
        self._keep = torch.ones_like(weight.T, memory_format=torch.contiguous_format)
        self._zeros = None if zeros is None else zeros.T.contiguous()
        self.sparsity = sparsity
        self.mask_structure = mask_structure
        self.quantizer = quantizer
        self.row_groups = list(row_groups) if row_groups is not None else [weight.shape[0]]

    @property
    def mask(self) -> Tensor:
        """Bool ``[out, in]``: True keeps a weight."""
        return self._keep.T.bool()

    def __call__(self, j: int, w: Tensor, sweep: BlockwiseOBS) -> Tensor:
        """Returns column ``j`` (current value ``w``, a buffer this overwrites) pruned, and
        quantized if asked, in ``w``."""
        if self.mask_structure is not None:
            n, m = self.mask_structure
            if j % m == 0:
                scores = self._existing_first(_run_saliency(sweep, j, j + m), j, j + m)
                self._keep[j : j + m] = self._without_existing(nm_mask_of_run(scores, n), j)
        elif j == sweep.block[0]:
            last = sweep.block[1]
            scores = self._existing_first(_saliency(sweep, j, last).T, j, last).T
            groups = scores.split(self.row_groups)
            masks = [unstructured_mask(group, self.sparsity) for group in groups]
            self._keep[j:last] = self._without_existing(torch.cat(masks).T, j)
        pruned = w.mul_(self._keep[j])
        return pruned if self.quantizer is None else self.quantizer(j, pruned, sweep)

    def _existing_first(self, scores: Tensor, start: int, stop: int) -> Tensor:
        """``scores`` (columns ``[start, stop)`` as rows) with the existing zeros lowest."""
        if self._zeros is None:
            return scores
        return scores.masked_fill(self._zeros[start:stop], float("-inf"))

    def _without_existing(self, keep: Tensor, start: int) -> Tensor:
        """``keep`` (columns from ``start`` as rows) with every existing zero pruned."""
        if self._zeros is None:
            return keep.to(self._keep.dtype)
        return (keep & ~self._zeros[start : start + keep.shape[0]]).to(self._keep.dtype)


def _saliency(sweep: BlockwiseOBS, start: int, stop: int) -> Tensor:
    """OBS error of pruning each weight of columns ``[start, stop)`` alone: ``w^2 / d^2``, with
    ``d = [H^-1]``'s Cholesky diagonal ``= 1 / R[j, j]``."""
    return sweep.current(start, stop).square() * sweep.factor.diagonal()[start:stop].square()


def _run_saliency(sweep: BlockwiseOBS, start: int, stop: int) -> Tensor:
    """:func:`_saliency` transposed, ``[stop - start, out]``: the sweep's own layout."""
    squared_diagonal = sweep.factor.diagonal()[start:stop, None].square()
    return sweep.current_columns(start, stop).square_().mul_(squared_diagonal)


def _check_structure(
    in_features: int, sparsity: float, mask_structure: tuple[int, int] | None
) -> None:
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity={sparsity!r} is invalid: expected a float in [0, 1]")
    if mask_structure is None:
        return
    n, m = mask_structure
    if not 0 < n < m or in_features % m:
        raise ValueError(
            f"mask_structure={mask_structure!r} is invalid for in_features={in_features}: "
            f"expected (n, m) with 0 < n < m and m dividing {in_features}"
        )
    if abs(sparsity - (1 - n / m)) > 1e-6:
        raise ValueError(
            f"sparsity={sparsity!r} contradicts mask_structure {n}:{m}, which prunes "
            f"{1 - n / m:g} of the weights: pass sparsity={1 - n / m:g}"
        )


def _existing_zeros(weight: Tensor, sparsity: float) -> Tensor:
    """The zeros of ``weight`` (bool ``[out, in]``), refused when more than ``sparsity``."""
    zeros = weight == 0
    existing = zeros.double().mean().item()
    if existing > sparsity:
        raise ValueError(
            f"preserve_sparsity_mask: the weight is already {existing:.4g} sparse, more than "
            f"sparsity={sparsity!r}; expected a sparsity of at least {existing:.4g}, or "
            "preserve_sparsity_mask=False"
        )
    return zeros


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    mask_structure: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    quantize_args: QuantizationArgs | None = None,
    row_groups: Sequence[int] | None = None,
    preserve_mask: bool = False,
    consume_hessian: bool = False,
) -> SparseGPTResult:
    """Prunes a weight with SparseGPT, optionally quantizing the kept weights jointly.

    Args:
        weight: ``[out, in]`` in ``nn.Linear`` layout (not modified).
        hessian: ``H = 2/n X^T X`` ``[in, in]`` of the layer's inputs (not modified unless
            ``consume_hessian``).
        sparsity: the fraction to prune, in [0, 1]; with ``mask_structure`` it must equal
            ``1 - n / m``.
        mask_structure: ``(n, m)``: keep ``n`` of every ``m`` consecutive input columns
            in each row; None for unstructured.
        block_size: columns per lazy batch update and per unstructured mask selection.
        dampening_frac: dampening as a fraction of the mean diagonal of ``H``.
        quantize_args: when given, kept weights are quantized in the same sweep (as
            GPTQ with natural column order); pruned weights stay exactly 0.

        row_groups: the row counts of the weights stacked into ``weight``: an unstructured
            mask is chosen over the rows of each group apart; None: over all rows together.
        preserve_mask: the weights that are 0 now stay pruned: they count first towards
            each block's (or N:M run's) pruned weights, and the most salient others are kept.
            A block that already holds more zeros keeps them all (it ends sparser).
        consume_hessian: whether ``hessian`` was made for this call, so that its buffer may
            hold the damped factor the sweep needs instead of a copy.

    Rows are pruned independently (an unstructured mask is chosen per block over the rows of
    a group), so weights that share ``H`` can be stacked into one call, unless per-tensor
    ``quantize_args`` couple them.

    Returns:
        The pruned weight, the mask, the loss, the qparams (or None), the dampening used and
        the loss per row.

    Raises:
        ValueError: on shapes or settings that do not fit, or with ``preserve_mask`` a
            weight already sparser than ``sparsity``.
        SingularHessianError: when no dampening makes ``H`` invertible.
    """
    _check_structure(weight.shape[-1], sparsity, mask_structure)
    zeros = _existing_zeros(weight, sparsity) if preserve_mask else None
    sweep = BlockwiseOBS(weight, hessian, block_size, dampening_frac, consume_hessian)
    quantizer = (
        None
        if quantize_args is None
        else make_column_quantizer(sweep.weight, quantize_args, weight.dtype)
    )
    pruner = _ColumnPruner(sweep.weight, sparsity, mask_structure, quantizer, row_groups, zeros)
    pruned, loss = sweep.run(pruner)
    scale, zero_point = (None, None) if quantizer is None else quantizer.qparams()
    return SparseGPTResult(
        pruned.to(weight.dtype),
        pruner.mask,
        loss,
        scale,
        zero_point,
        sweep.dampening_frac,
        sweep.row_losses,
    )
