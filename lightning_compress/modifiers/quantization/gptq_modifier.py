"""``GPTQModifier``: one-shot weight quantization with GPTQ, calibrated block by block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_compress.modifiers.base import ONE_SHOT
from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.layerwise_modifier import CompressedLayer, HessianMethod
from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme
from lightning_compress.modifiers.quantization.calibration import quantized_layer
from lightning_compress.modifiers.quantization.gptq import (
    GPTQResult,
    gptq_quantize,
    normalize_actorder,
    weights_to_keep,
)
from lightning_compress.modifiers.quantization.oneshot import LayerwiseQuantization
from lightning_compress.recipe.errors import RecipeError

__all__ = ["GPTQModifier"]

ACTORDER_DEFAULT = "static"


class GPTQModifier(LayerwiseQuantization, HessianMethod):
    """Quantizes the weights of targeted ``nn.Linear`` layers with GPTQ (one-shot only).

    Schemes are given as for :class:`QuantizationModifier` (a ``scheme`` preset or
    ``config_groups``; both take them through
    :class:`~lightning_compress.modifiers.quantization.schemes.QuantizationSchemes`). Given
    none, it takes the schemes of the one-shot ``QuantizationModifier`` of its recipe stage,
    as llm-compressor's ``GPTQModifier`` does: it quantizes their ``Linear`` layers (less its
    own ``ignore``), each once, and that modifier keeps the rest (an ``Embedding``). Weights
    take static ``tensor``, ``channel`` or ``group`` qparams, and input activations are
    quantized as there (static ranges are calibrated on the same data and reduced across
    ranks). The layer-wise flow, its errors and fallbacks are
    :class:`~lightning_compress.modifiers.layerwise_modifier.LayerwiseModifier`'s.

    At CALIBRATION_EPOCH_START each targeted layer gets a forward pre-hook that accumulates
    the Hessian of its inputs through a
    :class:`~lightning_compress.modifiers.hessian_collector.HessianCollector`: layers reading
    the same input (``q/k/v_proj``, ``gate/up_proj``) share one Hessian, updated once per
    forward, and padded tokens are skipped when the attention mask reaches the layers'
    blocks. At each SEQUENTIAL_EPOCH_END(subgraph=block) the targeted layers inside the block
    are quantized: their Hessians are summed over ranks, :func:`gptq_quantize` runs for every
    one of them, and only then are the layers changed and the Hessians freed. An error leaves
    the block's layers as they were. CALIBRATION_EPOCH_END quantizes the rest (every layer,
    with the basic pipeline). GPTQ needs calibration data: without it (data-free pipeline,
    ``finalize`` without calibration) it raises a ``RecipeError``.

    Afterwards each layer holds what :class:`QuantizationModifier` leaves (quantized weight,
    ``weight_scale``, ``weight_zero_point``, input qparams, ``quantization_scheme`` and the
    input quantizer), plus ``weight_g_idx`` for ``actorder`` ``"group"``/``"dynamic"``.
    Per-layer GPTQ losses go to ``layer_losses`` and the loggers (``GPTQ/loss``,
    ``GPTQ/seconds``); relative weight errors to ``layer_errors``.

    Hessians accumulate in float64 (twice the memory of float32), so a run on several ranks
    quantizes exactly like one process; GPTQ itself runs in float32 (float64 for float64
    weights).

    Args:
        scheme: a preset name, or ``{preset: [targets]}`` (see ``QuantizationModifier``);
            None with no ``config_groups``: the schemes of the stage's ``QuantizationModifier``.
        config_groups: compressed-tensors config groups (see ``QuantizationModifier``).
        targets: layers the ``scheme`` preset applies to.
        ignore: layers never quantized (e.g. ``lm_head``).
        kv_cache_scheme: fp8 arguments of the keys and values of every attention module
            (``strategy: tensor`` or ``attn_head``), calibrated block by block on the same
            data (see :mod:`~lightning_compress.modifiers.quantization.kv_cache`).
        start: -1: GPTQ is one-shot.
        block_size: columns per lazy batch update of the GPTQ sweep.
        dampening_frac: dampening added to the Hessian's diagonal, as a fraction of its mean
            (raised 10x up to three times when the Hessian is not invertible, then the
            layers fall back to round-to-nearest; see ``HessianMethod``).
        actorder: column order, as in compressed-tensors: ``"static"`` / ``"weight"`` visit
            columns by decreasing Hessian diagonal and keep the groups; ``"group"`` /
            ``"dynamic"`` also form the groups in that order (stored as ``weight_g_idx``; needs
            ``strategy: group``); ``"none"`` / None keep the natural order. Left at its
            default (``"static"``), a scheme's ``weights.actorder`` decides for its layers.
        offload_hessians: keep the Hessians on the CPU while blocks run on an accelerator.
        quantize_activations_in_calibration: one-shot: whether the calibration forwards run
            quantized layers with their inputs (and keys/values) quantized; False: unquantized
            until calibration ends, as llm-compressor does (see ``LayerwiseQuantization``).
        preserve_zeros: which exact zeros of a weight stay zero, so that a pruned model keeps
            its mask (e.g. SparseGPT 2:4 then GPTQ): ``"auto"`` (default) those of a layer
            with at least 10% exact zeros (a pruned layer; a dense model's float weights hold
            almost none, and GPTQ quantizes those like any weight); True every zero of every
            layer; False none (llm-compressor's GPTQ keeps none). Decided per layer, on its
            whole weight. A dense model dequantized from a coarse symmetric grid (int4 with
            per-channel scales: about 20% zeros) counts as pruned under ``"auto"``: give
            False there.
    """

    actorder: Literal["static", "weight", "group", "dynamic", "none"] | None = ACTORDER_DEFAULT
    preserve_zeros: bool | Literal["auto"] = "auto"

    log_tag: ClassVar[str] = "GPTQ"
    borrows_stage_schemes: ClassVar[bool] = True

    # ----------------------------------------------------------------- settings
    def validate(self) -> None:
        if self.start != ONE_SHOT:
            self.fail("start", "-1 (GPTQ is one-shot; QuantizationModifier does QAT)")
        super().validate()

    def _check_scheme(self, where: str, scheme: QuantizationScheme) -> None:
        super()._check_scheme(where, scheme)
        weights = scheme.weights
        if weights.dynamic:
            raise RecipeError(
                f"{type(self).__name__}.{where}.weights.dynamic: expected False (GPTQ computes "
                "static weight qparams), got True"
            )
        if self._actorder(weights, where) == "group" and weights.strategy != "group":
            self.fail(
                "actorder",
                f"'static', 'weight', 'none' or None for {where}, whose weights.strategy is "
                f"{weights.strategy!r} ('group' and 'dynamic' need strategy 'group')",
            )

    def _actorder(self, weights: QuantizationArgs, where: str = "scheme") -> str | None:
        """The column order for ``weights``: theirs (``weights.actorder``, as llm-compressor's
        recipes set it) when this modifier's ``actorder`` is left at its default, else this
        modifier's.

        Raises:
            RecipeError: when both are set and differ; the message names both.
        """
        own = normalize_actorder(self.actorder)
        if weights.actorder is None or weights.actorder == own:
            return own
        if self.actorder != ACTORDER_DEFAULT:
            raise RecipeError(
                f"{type(self).__name__}.actorder: {self.actorder!r} conflicts with "
                f"{where}.weights.actorder={weights.actorder!r}; set one of them"
            )
        return weights.actorder

    def _reorders_groups(self, weights: QuantizationArgs) -> bool:
        """Whether groups follow the activation order (then ``weight_g_idx`` is stored)."""
        return self._actorder(weights) == "group"

    # ------------------------------------------------------------- quantizing
    def stacks(
        self, names: list[str], statistics: Mapping[str, HessianAccumulator]
    ) -> list[list[str]]:
        """Groups the layers that one GPTQ sweep can quantize together.

        GPTQ treats rows independently, so layers that share a Hessian (``q/k/v_proj``,
        ``gate/up_proj``) and their weight arguments, dtype and device run as one stacked
        weight: one inversion and one column loop instead of one per layer. Per-tensor
        qparams couple the rows, so ``strategy: tensor`` layers run alone, and so do
        ``strategy: block`` layers (their scales are per tile of rows).
        """
        stacks: list[list[str]] = []
        keys: list[tuple[Any, ...]] = []
        for name in names:
            module, scheme = self._pending[name]
            key = (statistics[name], scheme.weights, module.weight.dtype, module.weight.device)
            shares = scheme.weights.strategy not in ("tensor", "block") and key in keys
            if shares:
                stacks[keys.index(key)].append(name)
            else:
                stacks.append([name])
                keys.append(key)
        return stacks

    def divisible(self, stack: list[str]) -> bool:
        """GPTQ's rows are independent, so a stack's layers may be quantized apart, unless
        they share one per-tensor global scale (``strategy: tensor_group``).

        Args:
            stack: a stack from :meth:`stacks`.

        Returns:
            Whether its layers may be quantized in separate calls.
        """
        return self._pending[stack[0]].settings.weights.strategy != "tensor_group"

    def row_divisible(self, name: str) -> bool:
        """GPTQ sweeps each row with its own error and keeps per-row qparams for strategies
        ``channel`` and ``group``, so those layers may be quantized in row slices; the
        qparams of the others couple rows (a per-tensor scale or global scale, tiles).

        Args:
            name: a pending layer.

        Returns:
            Whether its weight may be quantized in row slices.
        """
        return self._pending[name].settings.weights.strategy in ("channel", "group")

    def compress_rows(
        self, name: str, statistics: HessianAccumulator, rows: tuple[int, int]
    ) -> CompressedLayer:
        """GPTQ on the rows ``[start, stop)`` of layer ``name``'s weight.

        The column order (``actorder``) and ``g_idx`` come from the Hessian alone, so every
        slice gets the whole layer's; the slice's weight, qparams and loss are the whole
        layer's rows.

        Args:
            name: a layer that :meth:`row_divisible` allows.
            statistics: its reduced Hessian.
            rows: ``(start, stop)``.

        Returns:
            The slice's quantized weight, its rows of ``weight_scale`` and
            ``weight_zero_point``, the layer's other buffers and the slice's loss.
        """
        result = self._gptq([name], statistics, rows)
        g_idx = result.g_idx if self._reorders_groups(self._pending[name][1].weights) else None
        return quantized_layer(
            result.weight_q,
            result.scale,
            result.zero_point,
            self._observers.get(name),
            g_idx,
            loss=result.loss,
        )

    def join_rows(self, name: str, slices: list[CompressedLayer]) -> CompressedLayer:
        """Layer ``name`` from its row slices (:meth:`compress_rows`), in row order.

        Args:
            name: the layer.
            slices: its slices' results, covering its rows in order.

        Returns:
            The weight and per-row qparams stacked, the other buffers of the first slice
            (the same in all) and the losses summed.
        """
        first = slices[0]
        buffers = dict(first.buffers)
        for key in ("weight_scale", "weight_zero_point"):
            buffers[key] = torch.cat([piece.buffers[key] for piece in slices])
        weight = torch.cat([piece.weight for piece in slices])
        return CompressedLayer(weight, buffers, sum(piece.loss for piece in slices))

    def compress_stack(
        self, stack: list[str], statistics: HessianAccumulator
    ) -> dict[str, CompressedLayer]:
        """GPTQ on the stacked weights of ``stack``, split back into its layers.

        Args:
            stack: layers sharing one Hessian and weight arguments.
            statistics: their reduced Hessian.

        Returns:
            Each layer's quantized weight, qparams and GPTQ loss.

        Raises:
            ValueError: when the Hessian is not finite or cannot be inverted
                (``SingularHessianError``); the message names the layers.
        """
        result = self._gptq(stack, statistics)
        rows = [self._pending[name].module.weight.shape[0] for name in stack]
        per_row = (result.weight_q, result.scale, result.zero_point, result.row_losses)
        if len(stack) == 1:  # also per-tensor qparams, which have no rows to split
            parts = [(stack[0], *per_row)]
        else:
            parts = zip(stack, *(tensor.split(rows) for tensor in per_row), strict=True)
        g_idx = result.g_idx if self._reorders_groups(self._pending[stack[0]][1].weights) else None
        layers = {
            name: quantized_layer(
                weight_q,
                scale,
                zero_point,
                self._observers.get(name),
                g_idx,
                loss=row_losses.sum().item(),
            )
            for name, weight_q, scale, zero_point, row_losses in parts
        }
        if result.global_scale is not None:  # one for the stack: the layers vLLM fuses share it
            for layer in layers.values():
                layer.buffers["weight_global_scale"] = result.global_scale.clone()
        return layers

    def _gptq(
        self, stack: list[str], statistics: HessianAccumulator, rows: tuple[int, int] | None = None
    ) -> GPTQResult:
        """GPTQ for the pending layers ``stack`` (sharing the Hessian of ``statistics``), or for
        the rows ``[start, stop)`` of their stacked weight; errors name them."""
        weights = [self._pending[name][0].weight.detach() for name in stack]
        weight, keep = torch.cat(weights), self._keep(weights)
        if rows is not None:
            weight = weight[rows[0] : rows[1]]
            keep = None if keep is None else keep[rows[0] : rows[1]]
        args = self._pending[stack[0]][1].weights
        actorder = self._actorder(args)

        def quantize(converted: Tensor) -> GPTQResult:
            return gptq_quantize(
                weight,
                converted,
                args,
                self.block_size,
                self.dampening_frac,
                actorder,
                keep,
                consume_hessian=True,
            )

        return self.solve(stack, weight, statistics, quantize)

    def _keep(self, weights: list[Tensor]) -> Tensor | None:
        """The stacked pruning mask of ``weights`` (whole layers), each layer's decided on its
        own weight (see ``preserve_zeros``); None when no layer keeps a zero."""
        masks = [weights_to_keep(weight, self.preserve_zeros) for weight in weights]
        if all(mask is None for mask in masks):
            return None
        return torch.cat(
            [
                torch.ones_like(weight, dtype=torch.bool) if mask is None else mask
                for weight, mask in zip(weights, masks, strict=True)
            ]
        )
