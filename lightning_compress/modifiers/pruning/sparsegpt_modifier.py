"""``SparseGPTModifier``: one-shot pruning with SparseGPT, calibrated block by block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.layerwise_modifier import (
    CompressedLayer,
    HessianMethod,
    PendingLayer,
)
from lightning_compress.modifiers.pruning.calibrated import CalibratedPruningModifier
from lightning_compress.modifiers.pruning.sparsegpt import SparseGPTResult, sparsegpt_prune
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.recipe.errors import RecipeError

JOINT_STRATEGIES = ("tensor", "channel", "group")
"""Weight strategies a layer quantized before pruning is quantized again with."""

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

    A layer quantized earlier in the run (a ``GPTQModifier`` before it in the stage, as
    llm-compressor's ``quant_and_sparse`` recipe has it) is pruned and quantized again with
    its scheme in one sweep (SparseGPT's joint mode), and its ``weight_scale`` /
    ``weight_zero_point`` are replaced: its weights stay on the grid its qparams describe
    (llm-compressor prunes the quantized weights, leaving them off that grid until the
    checkpoint rounds them again).

    Args:
        sparsity: the fraction of each layer's weights to prune, in [0, 1) (exactly
            ``round(sparsity * numel)`` per block of columns); ``1 - N/M`` with N:M.
        mask_structure: ``"0:0"`` (unstructured) or ``"N:M"`` such as ``"2:4"``.
        block_size: columns per lazy batch update and per unstructured mask selection.
        dampening_frac: dampening added to the Hessian's diagonal, as a fraction of its mean
            (raised 10x up to three times when the Hessian is not invertible, then the
            layers fall back to magnitude pruning; see ``HessianMethod``).
        offload_hessians: keep the Hessians on the CPU while blocks run on an accelerator.
        preserve_sparsity_mask: weights that are already 0 (an earlier pruning) stay pruned
            and count towards ``sparsity``: each block of columns (or N:M run) prunes its
            zeros first, then the least salient other weights. A layer already sparser than
            ``sparsity`` is refused, naming it.
        targets: the layers to prune: ``Linear`` layers, or modules whose ``Linear`` layers
            are pruned (``model.layers.0``).
        ignore: layers left alone (e.g. ``lm_head``).
        start: -1: SparseGPT is one-shot.
    """

    preserve_sparsity_mask: bool = False

    log_tag = "SparseGPT"

    def stacks(
        self, names: list[str], statistics: Mapping[str, HessianAccumulator]
    ) -> list[list[str]]:
        """Layers sharing a Hessian, dtype and device form one stack; a layer quantized
        earlier in the run is swept alone (it is pruned and quantized again together)."""
        stacks: dict[tuple[Any, ...], list[str]] = {}
        for name in names:
            module = self._pending[name].module
            alone = quantized_weight_args(name, module) is not None
            key = (id(statistics[name]), module.weight.dtype, module.weight.device)
            stacks.setdefault((*key, name) if alone else key, []).append(name)
        return list(stacks.values())

    def divisible(self, stack: list[str]) -> bool:
        """Always: stacked layers are pruned row group by row group, so apart alike.

        Args:
            stack: a stack from :meth:`stacks`.

        Returns:
            True.
        """
        return True

    def compress_stack(
        self, stack: list[str], statistics: HessianAccumulator
    ) -> dict[str, CompressedLayer]:
        weights = [self._pending[name].module.weight.detach() for name in stack]
        if self.preserve_sparsity_mask:
            self._check_existing_sparsity(stack, weights)
        rows = [weight.shape[0] for weight in weights]
        result = self._prune(stack, torch.cat(weights), statistics, rows)
        if result.scale is not None:
            qparams = {"weight_scale": result.scale, "weight_zero_point": result.zero_point}
            return {stack[0]: CompressedLayer(result.weight, qparams, result.loss)}
        parts = zip(stack, result.weight.split(rows), result.row_losses.split(rows), strict=True)
        return {
            name: CompressedLayer(weight, loss=row_losses.sum().item())
            for name, weight, row_losses in parts
        }

    def row_divisible(self, name: str) -> bool:
        """An N:M mask is chosen in each row apart, so an N:M layer may be pruned in row
        slices, unless it keeps its zeros (``preserve_sparsity_mask`` checks the whole
        layer) or is quantized again with qparams that couple rows (``tensor``).

        Args:
            name: a pending layer.

        Returns:
            Whether its weight may be pruned in row slices.
        """
        if self.structure is None or self.preserve_sparsity_mask:
            return False
        args = quantized_weight_args(name, self._pending[name].module)
        return args is None or args.strategy in ("channel", "group")

    def compress_rows(
        self, name: str, statistics: HessianAccumulator, rows: tuple[int, int]
    ) -> CompressedLayer:
        """SparseGPT on the rows ``[start, stop)`` of layer ``name``'s weight.

        Args:
            name: a layer that :meth:`row_divisible` allows.
            statistics: its reduced Hessian.
            rows: ``(start, stop)``.

        Returns:
            The slice's pruned weight, its rows of the qparams (a layer quantized before)
            and its loss.
        """
        weight = self._pending[name].module.weight.detach()[rows[0] : rows[1]]
        result = self._prune([name], weight, statistics, None)
        qparams = {}
        if result.scale is not None:
            qparams = {"weight_scale": result.scale, "weight_zero_point": result.zero_point}
        return CompressedLayer(result.weight, qparams, result.loss)

    def join_rows(self, name: str, slices: list[CompressedLayer]) -> CompressedLayer:
        """Layer ``name`` from its row slices (:meth:`compress_rows`), in row order.

        Args:
            name: the layer.
            slices: its slices' results, covering its rows in order.

        Returns:
            The weights and qparams stacked and the losses summed.
        """
        buffers = {
            key: torch.cat([piece.buffers[key] for piece in slices]) for key in slices[0].buffers
        }
        weight = torch.cat([piece.weight for piece in slices])
        return CompressedLayer(weight, buffers, sum(piece.loss for piece in slices))

    def _prune(
        self,
        stack: list[str],
        weight: Tensor,
        statistics: HessianAccumulator,
        rows: list[int] | None,
    ) -> SparseGPTResult:
        """SparseGPT on ``weight`` (the stacked weights of ``stack``, or rows of its one
        layer), with the layers' Hessian; ``rows``: the stacked layers' row counts."""
        args = quantized_weight_args(stack[0], self._pending[stack[0]].module)

        def prune(hessian: Tensor) -> SparseGPTResult:
            return sparsegpt_prune(
                weight,
                hessian,
                self.sparsity,
                self.structure,
                self.block_size,
                self.dampening_frac,
                quantize_args=args,
                row_groups=rows,
                preserve_mask=self.preserve_sparsity_mask,
                consume_hessian=True,
            )

        return self.solve(stack, weight, statistics, prune)

    def _check_existing_sparsity(self, stack: list[str], weights: list[Tensor]) -> None:
        """Refuses a layer of ``stack`` whose weight is already sparser than ``sparsity``."""
        for name, weight in zip(stack, weights, strict=True):
            existing = (weight == 0).double().mean().item()
            if existing > self.sparsity:
                raise ValueError(
                    f"{type(self).__name__}: layer '{name}' is already {existing:.4g} sparse, "
                    f"more than sparsity={self.sparsity!r}, and preserve_sparsity_mask keeps "
                    f"its zeros; expected a sparsity of at least {existing:.4g}, or "
                    "preserve_sparsity_mask=False"
                )

    def apply_result(self, name: str, layer: PendingLayer, result: CompressedLayer) -> None:
        """Copies the pruned weight, and the new qparams of a layer quantized before.

        Args:
            name: the layer's name.
            layer: the layer.
            result: its pruned weight (and qparams).
        """
        super().apply_result(name, layer, result)
        with torch.no_grad():
            for buffer, value in result.buffers.items():
                getattr(layer.module, buffer).copy_(value)


def quantized_weight_args(name: str, module: nn.Module) -> QuantizationArgs | None:
    """The weight quantization of a layer quantized earlier in the run, which SparseGPT
    prunes and quantizes again in one sweep (pruning alone would move its kept weights off
    the quantization grid its qparams describe).

    Args:
        name: the layer's name.
        module: the layer.

    Returns:
        Its weight arguments, or None for a layer that holds no quantized weight.

    Raises:
        RecipeError: for a quantized layer the joint sweep cannot quantize again (activation
            order groups, a per-tensor global scale, dynamic weights).
    """
    scheme = getattr(module, "quantization_scheme", None)
    args = None if scheme is None else scheme.weights
    if args is None or not hasattr(module, "weight_scale"):
        return None
    if hasattr(module, "weight_g_idx") or args.strategy not in JOINT_STRATEGIES or args.dynamic:
        raise RecipeError(
            f"SparseGPTModifier: layer '{name}' was quantized earlier in this run "
            f"(weights {args.type} {args.num_bits}-bit, strategy {args.strategy!r}); pruning "
            f"quantizes it again in the same sweep only for strategies {list(JOINT_STRATEGIES)} "
            "without activation-order groups: expected the pruning in a stage before the "
            "quantization, or the layer in SparseGPTModifier.ignore"
        )
    return args
