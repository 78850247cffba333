"""``QuantizationTraining``: the quantization-aware training mode of ``QuantizationModifier``."""

from __future__ import annotations

from typing import Any

from loguru import logger
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import Modifier
from lightning_compress.modifiers.layerwise import check_finite_weights
from lightning_compress.modifiers.layerwise_modifier import PendingLayer
from lightning_compress.modifiers.quantization.args import QuantizationScheme
from lightning_compress.modifiers.quantization.calibration import relative_error
from lightning_compress.modifiers.quantization.learnable import (
    add_learnable_weight_fake_quantizer,
)
from lightning_compress.modifiers.quantization.qat import (
    OBSERVER_BUFFERS,
    TrainingInputObserver,
    WeightFakeQuantizer,
    add_weight_fake_quantizer,
    bake_weight,
    bake_weight_saved_baked,
    training_buffers,
)
from lightning_compress.modifiers.quantization.runtime import (
    attach_quantization,
    remove_quantization,
)
from lightning_compress.modifiers.quantization.schemes import has_static_inputs

__all__ = ["QuantizationTraining"]


class QuantizationTraining:
    """Fake-quantizes the planned layers during training, then bakes their weights.

    Created at ``initialize``, it adds every buffer and the weight parametrization the run
    needs (so a checkpoint loads strictly into a freshly set-up model); fake quantization
    takes effect at ``start``. Weight qparams follow the weight (min-max) on every forward
    and static input ranges are observed on every training forward, until
    ``freeze_observers``. At ``end`` (or finalize) the weights are baked to their quantized
    values; a checkpoint saved after ``end`` loads baked. Hooks and buffers belong to the
    modifier, so its ``abort`` and ``finalize`` remove them; relative weight errors go to its
    ``layer_errors`` and the loggers (``QuantizationError``).

    Args:
        modifier: the ``QuantizationModifier`` in training mode (initialized as far as its
            plan and ``layer_errors``).
        plan: its planned layers with their schemes.
        freeze_observers: the index from which qparams and input ranges stop changing.
        learnable_scales: train the weight scales as parameters (LSQ, see
            :mod:`~lightning_compress.modifiers.quantization.learnable`) instead of
            following the weight's min-max.

    Raises:
        Exception: whatever adding the buffers or parametrizations raised; what was added
            is removed first.
    """

    def __init__(
        self,
        modifier: Modifier,
        plan: dict[str, PendingLayer],
        freeze_observers: float | None,
        learnable_scales: bool = False,
    ) -> None:
        self._modifier = modifier
        self._learnable_scales = learnable_scales
        self._plan = plan
        self._freeze_observers = freeze_observers
        self._quantizers: list[WeightFakeQuantizer] = []
        self._trackers: list[TrainingInputObserver] = []
        self._attached: list[nn.Module] = []
        self._baked: list[nn.Module] = []  # restored from a checkpoint saved after ``end``
        self._load_hooks: list[RemovableHandle] = []
        try:
            self._prepare()
        except Exception:
            self.undo()
            raise

    # ----------------------------------------------------------- the mode's hooks
    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        """Switches fake quantization on and observes static input ranges."""
        for quantizer in self._quantizers:
            quantizer.enabled = True
        for module, scheme in self._plan.values():
            if module in self._baked:  # resumed after ``end``: quantized already
                attach_quantization(module, scheme)
                continue
            if has_static_inputs(scheme):
                tracker = TrainingInputObserver(module, scheme.input_activations)
                self._trackers.append(tracker)
                self._modifier.register_hook(module, tracker, "forward_pre", prepend=True)
            self._attach(module, scheme)

    def on_sequential_epoch_end(self, state: State, subgraph: nn.Module | None) -> None:
        """Nothing: training quantizes no layer at a block's end."""

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module]:
        """None: training compresses no layer from calibration inputs."""
        return []

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        """Freezes the qparams and input ranges once ``freeze_observers`` is reached."""
        if event.type_ == EventType.BATCH_START and self._freeze_observers is not None:
            # should_update with only a start: "has the index reached freeze_observers?"
            frozen = event.should_update(self._freeze_observers, None, None)
            for switch in (*self._quantizers, *self._trackers):
                switch.frozen = frozen

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        """Bakes every layer's weight to its quantized value (refusing a diverged weight)."""
        modules = {name: layer.module for name, layer in self._plan.items()}
        check_finite_weights(type(self._modifier).__name__, modules)
        errors = {}
        self._remove_load_hooks()
        for name, (module, _) in self._plan.items():
            if module in self._baked:
                continue
            original = module.parametrizations.weight.original
            errors[name] = relative_error(original, module.weight)
            bake_weight(module)
            for buffer in OBSERVER_BUFFERS:
                module._buffers.pop(buffer, None)
            self._modifier.keep_buffers(module)  # finished: an abort leaves it quantized
        self._quantizers.clear()
        self._attached.clear()
        self._modifier.layer_errors.update(errors)
        if state.loggers is not None and errors:
            state.loggers.log_scalars("QuantizationError", errors)
        self._modifier.remove_hooks()

    def on_finalize(self, state: State, **kwargs: Any) -> None:
        """Leaves the model unquantized, with a warning, when training ended before start."""
        if self._modifier.started_:
            return
        logger.warning(
            "{}: training ended before start={}; the model is left unquantized",
            type(self._modifier).__name__,
            self._modifier.start,
        )
        self.undo()

    def undo(self) -> None:
        """Removes what this mode added: quantized forwards, parametrizations and buffers."""
        for module in self._attached:
            remove_quantization(module)
        self._attached.clear()
        self._remove_load_hooks()
        for quantizer in self._quantizers:
            bake_weight(quantizer.owner, quantized=False)
        self._quantizers.clear()
        self._modifier.remove_buffers()

    # ------------------------------------------------------------------ helpers
    def _prepare(self) -> None:
        for module, scheme in self._plan.values():
            for buffer, value in training_buffers(module.weight, scheme).items():
                self._modifier.add_buffer(module, buffer, value)
            add = (
                add_learnable_weight_fake_quantizer
                if self._learnable_scales
                else add_weight_fake_quantizer
            )
            self._quantizers.append(add(module, scheme.weights))
            hook = module.register_load_state_dict_pre_hook(self._load_baked_layer)
            self._load_hooks.append(hook)

    def _load_baked_layer(self, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        """Load pre-hook: a checkpoint saved after ``end`` holds the layer baked; bake it too."""
        if bake_weight_saved_baked(module, state_dict, prefix):
            self._modifier.keep_buffers(module)
            self._quantizers = [item for item in self._quantizers if item.owner is not module]
            self._baked.append(module)

    def _remove_load_hooks(self) -> None:
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks.clear()

    def _attach(self, module: nn.Module, scheme: QuantizationScheme) -> None:
        attach_quantization(module, scheme)
        self._attached.append(module)
