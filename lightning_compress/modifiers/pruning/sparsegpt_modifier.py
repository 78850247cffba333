"""``SparseGPTModifier``: one-shot pruning with SparseGPT, calibrated block by block."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.hessian_collector import HessianCollector
from lightning_compress.modifiers.layerwise import solve_on_hessian
from lightning_compress.modifiers.pruning.calibrated import CalibratedPruningModifier
from lightning_compress.modifiers.pruning.sparsegpt import SparseGPTResult, sparsegpt_prune

__all__ = ["SparseGPTModifier"]


class SparseGPTModifier(CalibratedPruningModifier):
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
            (raised 10x up to three times when the Hessian is not invertible).
        offload_hessians: keep the Hessians on the CPU while blocks run on an accelerator.
        targets: the layers to prune (``Linear`` layers).
        ignore: layers left alone (e.g. ``lm_head``).
        start: -1: SparseGPT is one-shot.
    """

    block_size: int = 128
    dampening_frac: float = 0.01
    offload_hessians: bool = False

    log_tag = "SparseGPT"

    def validate(self) -> None:
        if self.block_size <= 0:
            self.fail("block_size", "an int > 0")
        if not 0 <= self.dampening_frac < 1:
            self.fail("dampening_frac", "a float in [0, 1)")
        super().validate()

    def make_collector(self) -> HessianCollector:
        return HessianCollector(offload=self.offload_hessians)

    def stacks(
        self, layers: dict[str, nn.Linear], statistics: Mapping[str, HessianAccumulator]
    ) -> list[list[str]]:
        stacks: dict[tuple[int, torch.dtype, torch.device], list[str]] = {}
        for name, layer in layers.items():
            key = (id(statistics[name]), layer.weight.dtype, layer.weight.device)
            stacks.setdefault(key, []).append(name)
        return list(stacks.values())

    def prune_layers(
        self, weights: dict[str, Tensor], statistics: HessianAccumulator
    ) -> dict[str, tuple[Tensor, float]]:
        names = list(weights)
        stacked = torch.cat(list(weights.values()))
        rows = [weight.shape[0] for weight in weights.values()]

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
            type(self).__name__, names, stacked, statistics.hessian(), self.dampening_frac, prune
        )
        parts = zip(names, result.weight.split(rows), result.row_losses.split(rows), strict=True)
        return {name: (weight, row_losses.sum().item()) for name, weight, row_losses in parts}
