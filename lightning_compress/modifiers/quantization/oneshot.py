"""``LayerwiseQuantization``: one-shot quantization of each layer, round to nearest by default.

The layer-wise flow (:class:`~lightning_compress.modifiers.layerwise_modifier.LayerwiseModifier`)
with what quantizing adds to it: observers of static input activations, reduced across ranks
before a layer is quantized, and a quantized layer that keeps its qparams, its scheme and its
quantized forward. Round-to-nearest is both its method and its data-free fallback;
``GPTQModifier`` replaces the method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_compress.core.events import Event
from lightning_compress.core.state import State
from lightning_compress.modifiers.layerwise import needs_data
from lightning_compress.modifiers.layerwise_modifier import (
    CompressedLayer,
    LayerwiseModifier,
    PendingLayer,
)
from lightning_compress.modifiers.quantization.calibration import (
    CalibrationObserver,
    quantize_layer,
    relative_error,
)
from lightning_compress.modifiers.quantization.fused import fused_groups
from lightning_compress.modifiers.quantization.kv_cache import AttentionCalibration
from lightning_compress.modifiers.quantization.ops import global_scale
from lightning_compress.modifiers.quantization.runtime import attach_quantization
from lightning_compress.modifiers.quantization.schemes import (
    QuantizationSchemes,
    has_static_inputs,
)

__all__ = ["LayerwiseQuantization"]


class LayerwiseQuantization(QuantizationSchemes, LayerwiseModifier, register=False):
    """One-shot quantization of the planned layers, one block at a time.

    Layers with static input activations get a
    :class:`~lightning_compress.modifiers.quantization.calibration.CalibrationObserver` at
    the start of calibration; before a layer is quantized its range is reduced across ranks
    (min/max), so every rank gets the qparams one process seeing all the data would. A
    quantized layer holds its quantized weight, ``weight_scale`` / ``weight_zero_point``
    (and ``input_scale`` / ``input_zero_point`` for static inputs) buffers, kept by an abort,
    and a ``quantization_scheme`` attribute, and quantizes its input at inference through a
    persistent pre-hook. Relative weight errors go to ``layer_errors`` and the loggers
    (``QuantizationError``).

    With a ``kv_cache_scheme`` or attention groups, the attention modules' states are
    calibrated alongside
    (:class:`~lightning_compress.modifiers.quantization.kv_cache.AttentionCalibration`): each
    block's scales are fixed when the block ends; the attention implementation is restored
    at finalize and on abort.

    ``quantize_activations_in_calibration`` decides what the calibration forwards after a
    layer is quantized compute with: True runs its input (and its attention's keys and
    values) fake-quantized from then on, so later layers' Hessians and input ranges are
    measured on quantized activations; False (llm-compressor's behaviour: it disables
    quantization until calibration ends) runs them unquantized, with the quantized weights,
    and gives the layers their quantized forward when calibration ends (or on abort).

    Args:
        quantize_activations_in_calibration: one-shot only; see above.
    """

    quantize_activations_in_calibration: bool = True

    data_free_method: ClassVar[str] = "round-to-nearest (same scheme)"

    def validate(self) -> None:
        if not self.quantize_activations_in_calibration and not self.is_one_shot:
            self.fail(
                "quantize_activations_in_calibration",
                "true for quantization-aware training (start >= 0), which has no calibration",
            )
        super().validate()

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        super().on_initialize(state, **kwargs)
        self._observers: dict[str, CalibrationObserver] = {}
        self._unattached: dict[str, PendingLayer] = {}  # quantized, forward not yet attached
        self.layer_errors: dict[str, float] = {}
        plan = self.attention_plan(state.model)  # checked in both modes
        self._attention = None
        if plan and self.is_one_shot:
            quantized = self.quantize_activations_in_calibration
            self._attention = AttentionCalibration(self, plan, quantize_calibrated=quantized)

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        super().on_start(state, event, **kwargs)
        if self._attention is None:
            return
        if event is None:
            raise needs_data(
                type(self).__name__,
                "finalize ran without calibration (the kv_cache_scheme's scales are calibrated)",
            )
        try:
            self._attention.start()
        except BaseException:
            self._attention.close()
            raise

    def on_sequential_epoch_end(self, state: State, subgraph: Any) -> None:
        super().on_sequential_epoch_end(state, subgraph)
        if self.active and self._attention is not None:
            self._attention.finish(subgraph)

    def skip_block(self, state: State, block: nn.Module) -> None:
        """Forgets the pending layers inside ``block`` (compressed by an earlier run).

        Args:
            state: the session's state.
            block: the finished block.

        Raises:
            NotImplementedError: with attention (KV-cache) calibration, whose scales are
                calibrated per block.
        """
        if self.active and self._attention is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: a run calibrating the attention states "
                f"(kv_cache_scheme) cannot resume after blocks an earlier run finished; remove "
                f"the unfinished output to compress from the start"
            )
        super().skip_block(state, block)

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        if self._attention is not None:
            self._attention.finish(None)
        super().on_end(state, event, **kwargs)
        self._attach_quantization()

    def on_finalize(self, state: State, **kwargs: Any) -> Any:
        self._close_attention()
        return super().on_finalize(state, **kwargs)

    def abort(self, state: State) -> None:
        """Stop without finishing: also restores the attention implementation (attention
        modules already calibrated keep their scales, as quantized layers do).

        Args:
            state: the session's state.
        """
        self._close_attention()
        self._attach_quantization()
        super().abort(state)

    def _attach_quantization(self) -> None:
        """Gives the quantized layers whose quantized forward waited for the end of
        calibration (``quantize_activations_in_calibration=False``) that forward."""
        for layer in getattr(self, "_unattached", {}).values():
            attach_quantization(layer.module, layer.settings)
        self._unattached = {}

    def _close_attention(self) -> None:
        if getattr(self, "_attention", None) is not None:
            self._attention.close()

    def layer_hooks(self, name: str, layer: PendingLayer) -> list[tuple[Callable, str]]:
        """The observer of the layer's static input activations, if it has them.

        Args:
            name: the layer's name.
            layer: the layer and its scheme.

        Returns:
            ``[(observer, "forward_pre")]``, or nothing.
        """
        if not has_static_inputs(layer.settings):
            return []
        observer = CalibrationObserver(name, layer.settings.input_activations)
        self._observers[name] = observer
        return [(observer, "forward_pre")]

    def compute_layers(self, state: State, names: list[str]) -> dict[str, CompressedLayer]:
        """Reduces the layers' input ranges across ranks, then quantizes them (unchanged).

        Args:
            state: the session's state.
            names: the layers, in plan order (the same on every rank).

        Returns:
            Each layer's quantized weight and buffers.
        """
        for name in names:  # every rank reduces the same observers in the same order
            if name in self._observers:
                self._observers[name].reduce_across_ranks()
        return self._quantize_layers(state, names)

    def _quantize_layers(self, state: State, names: list[str]) -> dict[str, CompressedLayer]:
        """The layer-wise computation of ``names``, after their ranges are reduced."""
        return super().compute_layers(state, names)

    def stacks(self, names: list[str], statistics: Mapping[str, Any]) -> list[list[str]]:
        """Layers vLLM fuses (q/k/v, gate/up) with equal ``tensor_group`` (NVFP4) weight
        arguments form one stack: they share one per-tensor global scale. Others are alone.

        Args:
            names: the layers to quantize.
            statistics: unused.

        Returns:
            The stacks, covering ``names``.
        """
        stacks = []
        for group in fused_groups(names):
            weights = {self._pending[name].settings.weights for name in group}
            (args,) = weights if len(weights) == 1 else (None,)
            shared = args is not None and args.strategy == "tensor_group"
            stacks.extend([group] if shared else [[name] for name in group])
        return stacks

    def compress_stack(self, stack: list[str], statistics: Any) -> dict[str, CompressedLayer]:
        """Round-to-nearest, layer by layer (no statistics needed); the layers of a
        ``tensor_group`` stack share the smallest of their global scales, so no group scale
        of any of them leaves fp8's range.

        Args:
            stack: the layers.
            statistics: unused.

        Returns:
            Each layer's quantized weight and buffers.

        Raises:
            ValueError: naming a ``tensor_group`` layer whose weight is all zero or not finite.
        """
        shared = self._shared_global_scale(stack) if len(stack) > 1 else None
        return {
            name: quantize_layer(*self._pending[name], self._observers.get(name), name, shared)
            for name in stack
        }

    def _shared_global_scale(self, stack: list[str]) -> Tensor:
        """The smallest of the per-tensor global scales of the layers of ``stack``."""
        scales = []
        for name in stack:
            module, scheme = self._pending[name]
            scales.append(global_scale(module.weight, scheme.weights, f"layer '{name}' weight"))
        return torch.cat(scales).amin().reshape(1)

    def compress_data_free(self, name: str) -> CompressedLayer:
        """Round-to-nearest with the layer's scheme (its weight observer gives the qparams).

        Args:
            name: a pending layer.

        Returns:
            The quantized weight and buffers.
        """
        return quantize_layer(*self._pending[name], self._observers.get(name), name)

    def apply_result(self, name: str, layer: PendingLayer, result: CompressedLayer) -> None:
        """Copies the quantized weight, adds the qparams and attaches the quantized forward.

        Args:
            name: the layer's name.
            layer: the layer and its scheme.
            result: its quantized weight and buffers.
        """
        self._observers.pop(name, None)
        self.layer_errors[name] = relative_error(layer.module.weight, result.weight)
        super().apply_result(name, layer, result)
        for buffer, value in result.buffers.items():
            self.add_buffer(layer.module, buffer, value)
        if self.quantize_activations_in_calibration or layer.settings.input_activations is None:
            attach_quantization(layer.module, layer.settings)
        else:  # its inputs stay unquantized until calibration ends
            self._unattached[name] = layer
        self.keep_buffers(layer.module)  # finished: an abort leaves the layer quantized

    def log_results(self, state: State, results: dict[str, CompressedLayer]) -> None:
        if state.loggers is not None and results:
            errors = {name: self.layer_errors[name] for name in results}
            state.loggers.log_scalars("QuantizationError", errors)
