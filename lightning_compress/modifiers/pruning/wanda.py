"""Wanda (Sun et al. 2023): prune by weight magnitude times input-channel norm, row by row."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_compress.modifiers.channel_statistics import ChannelStatistic
from lightning_compress.modifiers.layerwise import check_finite_inputs
from lightning_compress.modifiers.layerwise_modifier import CompressedLayer
from lightning_compress.modifiers.pruning.calibrated import CalibratedPruningModifier
from lightning_compress.modifiers.pruning.channel_norms import ChannelNormCollector
from lightning_compress.modifiers.pruning.masks import row_mask

__all__ = ["WandaPruningModifier", "wanda_mask"]


def wanda_mask(
    weight: Tensor,
    channel_norms: Tensor,
    sparsity: float,
    mask_structure: tuple[int, int] | None = None,
    layer: str | None = None,
) -> Tensor:
    """The Wanda mask: scores ``|W_ij| * ||x_j||_2`` compared within each output row.

    Unstructured, each row prunes its ``round(sparsity * in_features)`` lowest scores; N:M,
    each row keeps the ``n`` highest of every ``m`` consecutive columns. Among equal scores
    the lower column is pruned first (as everywhere in ``masks``). Scores are formed in
    float64.

    Args:
        weight: ``[out, in]`` in ``nn.Linear`` layout.
        channel_norms: ``||x_j||_2`` over the calibration tokens, ``[in]``.
        sparsity: the fraction of each row to prune, in [0, 1] (unstructured only).
        mask_structure: ``(n, m)`` to keep ``n`` of every ``m`` columns; None: unstructured.
        layer: the layer's name, for error messages.

    Returns:
        A bool mask shaped like ``weight``: True keeps a weight.

    Raises:
        ValueError: when ``channel_norms`` does not fit ``weight``, or ``m`` does not divide
            ``in``.
    """
    width = weight.shape[-1]
    if weight.dim() != 2 or channel_norms.shape != (width,):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} and channel_norms of shape "
            f"{tuple(channel_norms.shape)} do not fit: expected [out, in] and [in]"
        )
    scores = weight.detach().abs().double() * channel_norms.to(weight.device, torch.float64)
    return row_mask(scores, sparsity, mask_structure, layer)


class WandaPruningModifier(CalibratedPruningModifier):
    """Prunes targeted ``nn.Linear`` layers with Wanda (one-shot only).

    Each weight scores ``|W_ij| * ||x_j||_2``, ``x_j`` the layer's input channel ``j`` over
    every calibration token (padding excluded when the attention mask reaches the layers'
    blocks); each output row prunes its lowest scores (``sparsity`` of the row, or N:M along
    the row). Only the squared channel norms are accumulated, in float64, shared between
    layers that read the same input; they are summed across ranks, so several processes
    prune exactly like one. Weights are not updated otherwise. Calibration, block-by-block
    pruning and errors follow :class:`CalibratedPruningModifier`; logs go to ``Wanda/...``.

    Args:
        sparsity: the fraction of each row to prune, in [0, 1); ``1 - N/M`` with N:M.
        mask_structure: ``"0:0"`` (unstructured) or ``"N:M"`` such as ``"2:4"``.
        targets: the layers to prune: ``Linear`` layers, or modules whose ``Linear`` layers
            are pruned (``model.layers.0``).
        ignore: layers left alone (e.g. ``lm_head``).
        start: -1: Wanda is one-shot.
    """

    log_tag = "Wanda"

    def make_collector(self) -> ChannelNormCollector:
        return ChannelNormCollector()

    def compress_stack(
        self, stack: list[str], statistics: ChannelStatistic
    ) -> dict[str, CompressedLayer]:
        owner = type(self).__name__
        check_finite_inputs(owner, stack, statistics.values, "input-norm statistic")
        norms = statistics.values.sqrt()
        results = {}
        for name in stack:
            weight = self._pending[name].module.weight.detach()
            mask = wanda_mask(weight, norms, self.sparsity, self.structure, layer=name)
            results[name] = CompressedLayer(torch.where(mask, weight, 0))
        return results
