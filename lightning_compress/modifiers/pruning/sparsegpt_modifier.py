"""``SparseGPTModifier``: one-shot pruning with SparseGPT, calibrated block by block."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.layerwise import solve_on_hessian
from lightning_compress.modifiers.layerwise_modifier import CompressedLayer, HessianMethod
from lightning_compress.modifiers.pruning.calibrated import CalibratedPruningModifier
from lightning_compress.modifiers.pruning.sparsegpt import SparseGPTResult, sparsegpt_prune

__all__ = ["SparseGPTModifier"]


class SparseGPTModifier(CalibratedPruningModifier, HessianMethod):
    """Prunes targeted ``nn.Linear`` layers with SparseGPT (one-shot only).

    Each layer's input Hessian is accumulated as for ``GPTQModifier``, through a
    :class:`~lightning_compress.modifiers.hessian_collector.HessianCollector`: layers
    reading the same input (``q/k/v_proj``, ``gate/up_proj``) share one Hessian, padded
    tokens are skipped, and the float64 sums are reduced across ranks, so several processes
    prune exactly like one. :func:`~lightning_compress.modifiers.pruning.sparsegpt.sparsegpt_prune`
    then sweeps the columns: the mask is chosen by OBS saliency (per block of ``block_size``
    columns, or per N:M run) and the kept weights are updated to compensate. It runs in
    float32 (float64 for float64 weights). With N:M, whose rows are pruned independently,
    layers sharing a Hessian (and dtype and device) are swept together as one stacked weight.
    Calibration, block-by-block pruning and errors follow :class:`CalibratedPruningModifier`;
    per-layer OBS losses go to ``layer_losses`` and ``SparseGPT/loss``.

    Args:
        sparsity: the fraction of each layer's weights to prune, in [0, 1) (exactly
            ``round(sparsity * numel)`` per block of columns); ``1 - N/M`` with N:M.
        mask_structure: ``"0:0"`` (unstructured) or ``"N:M"`` such as ``"2:4"``.
        block_size: columns per lazy batch update and per unstructured mask selection.
        dampening_frac: dampening added to the Hessian's diagonal, as a fraction of its mean
            (raised 10x up to three times when the Hessian is not invertible, then the
            layers fall back to magnitude pruning; see ``HessianMethod``).
        offload_hessians: keep the Hessians on the CPU while blocks run on an accelerator.
        targets: the layers to prune (``Linear`` layers).
        ignore: layers left alone (e.g. ``lm_head``).
        start: -1: SparseGPT is one-shot.
    """

    log_tag = "SparseGPT"

    def stacks(
        self, names: list[str], statistics: Mapping[str, HessianAccumulator]
    ) -> list[list[str]]:
        stacks: dict[tuple[int, torch.dtype, torch.device], list[str]] = {}
        for name in names:
            weight = self._pending[name].module.weight
            key = (id(statistics[name]), weight.dtype, weight.device)
            stacks.setdefault(key, []).append(name)
        return list(stacks.values())

    def compress_stack(
        self, stack: list[str], statistics: HessianAccumulator
    ) -> dict[str, CompressedLayer]:
        weights = [self._pending[name].module.weight.detach() for name in stack]
        stacked = torch.cat(weights)
        rows = [weight.shape[0] for weight in weights]

        def prune(hessian: Tensor) -> SparseGPTResult:
            return sparsegpt_prune(
                stacked,
                hessian,
                self.sparsity,
                self.structure,
                self.block_size,
                self.dampening_frac,
                row_groups=rows,
            )

        result = solve_on_hessian(
            type(self).__name__, stack, stacked, statistics.hessian(), self.dampening_frac, prune
        )
        parts = zip(stack, result.weight.split(rows), result.row_losses.split(rows), strict=True)
        return {
            name: CompressedLayer(weight, loss=row_losses.sum().item())
            for name, weight, row_losses in parts
        }
