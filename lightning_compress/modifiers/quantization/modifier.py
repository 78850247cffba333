"""``QuantizationModifier``: weight and activation quantization, one-shot or trained (QAT)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from loguru import logger
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import ONE_SHOT, Modifier
from lightning_compress.modifiers.layerwise import (
    check_finite_weights,
    layers_inside,
    linear_layers,
    modules_inside,
)
from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.calibration import (
    CalibrationObserver,
    QuantizedLayer,
    quantize_layer,
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
from lightning_compress.modifiers.tied_weights import untie_weights
from lightning_compress.recipe.errors import RecipeError

__all__ = ["QuantizationModifier"]

TRAINING_INPUT_OBSERVERS = ("minmax", "moving_average")

Plan = dict[str, tuple[nn.Linear, QuantizationScheme]]


class QuantizationModifier(Modifier):
    """Quantizes the weights and input activations of targeted ``nn.Linear`` layers.

    **One-shot** (``start: -1``). At CALIBRATION_EPOCH_START, layers with static input
    activations get observers. Each SEQUENTIAL_EPOCH_END(subgraph=block) quantizes the
    layers inside ``block``, so the next block is calibrated on quantized outputs;
    CALIBRATION_EPOCH_END quantizes the rest (all of them after a whole-model pass). Without
    calibration both happen at finalize, which works for weight-only and dynamic schemes.
    A group of layers is computed in full before any of them changes. Under several
    processes the static input ranges are reduced across ranks (min/max) first, so every rank
    gets the qparams one process seeing all the data would.

    **Quantization-aware training** (``start >= 0``). ``initialize`` adds every buffer and the
    weight parametrization the run needs (so a checkpoint loads strictly into a freshly
    set-up model); fake quantization takes effect at ``start``. Weight qparams follow the
    weight (min-max) on every forward and static input ranges are observed on every
    training forward, until ``freeze_observers``. At ``end`` (or finalize) the weights are
    baked to their quantized values.

    Afterwards every quantized layer holds its quantized weight, ``weight_scale`` /
    ``weight_zero_point`` (and ``input_scale`` / ``input_zero_point`` for static inputs)
    buffers and a ``quantization_scheme`` attribute, and keeps quantizing its input at
    inference through a persistent pre-hook
    (:func:`~lightning_compress.modifiers.quantization.runtime.remove_quantization` undoes it).

    Before changing anything, ``initialize`` refuses a targeted layer whose weight holds NaN
    or Inf, naming it (and so does the bake at the end of quantization-aware training), and
    gives a layer whose weight another module shares (``lm_head`` tied to the input
    embedding) its own copy, with a warning (see
    :func:`~lightning_compress.modifiers.tied_weights.untie_weights`).

    Args:
        scheme: a preset name (``W8A16``, ``W4A16``, ``W4A16_ASYM``, ``W8A8``, ``W4A8``,
            ``FP8``, ``FP8_DYNAMIC``) applied to ``targets``, or ``{preset: [targets]}``.
        config_groups: ``{group_name: {targets, weights: {...}, input_activations: {...}}}``
            in compressed-tensors form (``num_bits``, ``type``, ``symmetric``, ``strategy``,
            ``group_size``, ``dynamic``, ``observer``, ``averaging_constant``).
        targets: layers the ``scheme`` preset applies to.
        ignore: layers never quantized (e.g. ``lm_head``).
        start: -1 for one-shot, else when quantization-aware training starts.
        end: when quantization-aware training ends and weights are baked (-1 or None: at
            the end of training).
        freeze_observers: quantization-aware training only: the index (epochs or steps, like
            ``start``) from which weight qparams and static input ranges stop changing.
    """

    scheme: str | dict[str, list[str]] | None = None
    config_groups: dict[str, dict[str, Any]] | None = None
    start: float | None = ONE_SHOT
    freeze_observers: float | None = None

    # ----------------------------------------------------------------- settings
    def validate(self) -> None:
        if self.scheme is None and self.config_groups is None:
            self.fail("scheme", f"a preset name ({', '.join(PRESET_SCHEMES)}) or config_groups")
        if self.start is None:
            self.fail("start", "-1 (one-shot) or an index >= 0 (quantization-aware training)")
        if self.freeze_observers is not None:
            if self.is_one_shot:
                self.fail("freeze_observers", "None for one-shot quantization (start=-1)")
            if self.freeze_observers <= self.start:
                self.fail("freeze_observers", f"an index after start={self.start}")
        for where, scheme in self._labeled_schemes():
            self._check_scheme(where, scheme)

    def compression_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The linear layers a scheme of this modifier quantizes (see ``Modifier``)."""
        return {name: module for name, (module, _) in self._plan_layers(model).items()}

    def resolved_schemes(self) -> list[QuantizationScheme]:
        """The schemes this modifier applies, presets and config groups together.

        Returns:
            The schemes, in recipe order.

        Raises:
            RecipeError: for an unknown preset or an invalid config group; the message names
                the field.
        """
        return [scheme for _, scheme in self._labeled_schemes()]

    @property
    def needs_calibration_data(self) -> bool:
        """True when a scheme has static input activations (their ranges are calibrated)."""
        return self.is_one_shot and any(map(_has_static_inputs, self.resolved_schemes()))

    def _labeled_schemes(self) -> list[tuple[str, QuantizationScheme]]:
        """The schemes with the field they come from (``scheme`` or ``config_groups.<name>``)."""
        name = type(self).__name__
        presets = {self.scheme: self.targets} if isinstance(self.scheme, str) else self.scheme
        labeled = []
        for preset, targets in (presets or {}).items():
            try:
                labeled.append(("scheme", preset_scheme(preset, _as_list(targets))))
            except ValueError as err:
                raise RecipeError(f"{name}.scheme: {err}") from err
        for group, spec in (self.config_groups or {}).items():
            where = f"config_groups.{group}"
            try:
                labeled.append((where, QuantizationScheme.from_dict(spec, where=where)))
            except ValueError as err:
                raise RecipeError(f"{name}.{err}") from err
        return labeled

    def _check_scheme(self, where: str, scheme: QuantizationScheme) -> None:
        def bad(field: str, expected: str, got: Any) -> RecipeError:
            return RecipeError(
                f"{type(self).__name__}.{where}.{field}: expected {expected}, got {got!r}"
            )

        if scheme.weights is None:
            raise RecipeError(
                f"{type(self).__name__}.{where}: scheme for {scheme.targets} has no 'weights'; "
                "expected weight quantization arguments"
            )
        if scheme.output_activations is not None:
            raise bad("output_activations", "None (outputs are not quantized)", "arguments")
        inputs = scheme.input_activations
        static_inputs = inputs is not None and not inputs.dynamic
        if static_inputs and inputs.strategy != "tensor":
            raise bad(
                "input_activations.strategy",
                "'tensor' for static input activations (or dynamic=True)",
                inputs.strategy,
            )
        if self.is_one_shot:
            return
        if scheme.weights.observer != "minmax":
            raise bad(
                "weights.observer",
                "'minmax' for quantization-aware training (weight qparams follow the weight)",
                scheme.weights.observer,
            )
        if static_inputs and inputs.observer not in TRAINING_INPUT_OBSERVERS:
            raise bad(
                "input_activations.observer",
                f"one of {list(TRAINING_INPUT_OBSERVERS)} for quantization-aware training",
                inputs.observer,
            )

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self._plan = self._plan_layers(state.model)
        layers = {name: module for name, (module, _) in self._plan.items()}
        check_finite_weights(type(self).__name__, layers)
        optimizer = None if self.is_one_shot else state.optimizer
        untie_weights(type(self).__name__, state.model, layers, optimizer)
        self._pending: Plan = dict(self._plan)
        self._observers: dict[str, CalibrationObserver] = {}
        self._layer_hooks: dict[str, list[RemovableHandle]] = {}
        self._quantizers: list[WeightFakeQuantizer] = []
        self._trackers: list[TrainingInputObserver] = []
        self._attached: list[nn.Module] = []
        self._baked: list[nn.Module] = []  # restored from a checkpoint saved after ``end``
        self._load_hooks: list[RemovableHandle] = []
        self.layer_errors: dict[str, float] = {}
        if not self.is_one_shot:
            try:
                self._prepare_training()
            except Exception:
                self._undo_training()
                raise

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        if self.is_one_shot:
            self._start_calibration()
        else:
            self._start_training()

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END or not self.is_one_shot:
            return
        if not self.started_ or self.ended_:
            return
        pending = {name: module for name, (module, _) in self._pending.items()}
        names = layers_inside(type(self).__name__, kwargs.get("subgraph"), pending)
        self._quantize_pending(state, names)

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module] | None:
        """The pending layers inside ``subgraph``: each is quantized from its own inputs.

        Args:
            subgraph: the block about to be calibrated.

        Returns:
            The layers (none outside a one-shot calibration).
        """
        if not self.is_one_shot or not self.active:
            return []
        return modules_inside(subgraph, [module for module, _ in self._pending.values()])

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.BATCH_START and self.freeze_observers is not None:
            # should_update with only a start: "has the index reached freeze_observers?"
            self._set_frozen(event.should_update(self.freeze_observers, None, None))

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        if self.is_one_shot:
            self._quantize_pending(state, list(self._pending))
        else:
            self._finish_training(state)
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs: Any) -> None:
        if not self.is_one_shot and not self.started_:
            logger.warning(
                "{}: training ended before start={}; the model is left unquantized",
                type(self).__name__,
                self.start,
            )
            self._undo_training()

    def abort(self, state: State) -> None:
        """Stop without finishing: undo what this modifier added to the model.

        Removes the calibration hooks and observers, and for quantization-aware training the
        quantized forward, the parametrizations and buffers. Layers already quantized one-shot
        stay quantized with their qparams and quantized forward, so the model stays
        consistent (the pipeline records which blocks are).

        Args:
            state: the session's state.
        """
        for module in self._attached:
            remove_quantization(module)
        if not self.is_one_shot:
            self._undo_training()
        super().abort(state)

    # ----------------------------------------------------------------- planning
    def _plan_layers(self, model: nn.Module) -> Plan:
        owner = type(self).__name__
        plan: Plan = {}
        for scheme in self.resolved_schemes():
            layers = linear_layers(owner, self.resolve_targets(model, scheme.targets))
            for name, module in layers.items():
                if name in plan:
                    raise RecipeError(
                        f"{owner}: layer '{name}' is targeted by two schemes "
                        f"({plan[name][1].targets} and {scheme.targets}); expected one"
                    )
                plan[name] = (module, scheme)
        _check_group_sizes(owner, plan)
        return plan

    # ----------------------------------------------------------------- one-shot
    def _start_calibration(self) -> None:
        for name, (_, scheme) in self._plan.items():
            if _has_static_inputs(scheme):
                observer = CalibrationObserver(name, scheme.input_activations)
                self._observers[name] = observer
                self.register_layer_hook(name, observer, "forward_pre")

    def register_layer_hook(self, name: str, hook: Callable[..., Any], kind: str) -> None:
        """Registers a calibration hook on the planned layer ``name``, removed once the layer
        is quantized.

        Args:
            name: the layer's name.
            hook: the hook.
            kind: see :meth:`Modifier.register_hook`.
        """
        handle = self.register_hook(self._plan[name][0], hook, kind)
        self._layer_hooks.setdefault(name, []).append(handle)

    def _quantize_pending(self, state: State, names: list[str]) -> None:
        """Quantizes the pending layers ``names``: all are computed before any changes."""
        for name in names:  # every rank reduces the same observers in the same order
            if name in self._observers:
                self._observers[name].reduce_across_ranks()
        results = self._quantize_layers(state, names)
        errors = {}
        for name, result in results.items():
            module, scheme = self._pending.pop(name)
            self._observers.pop(name, None)
            for handle in self._layer_hooks.pop(name, []):
                handle.remove()
            errors[name] = _relative_error(module.weight, result.weight)
            with torch.no_grad():
                module.weight.copy_(result.weight)
            for buffer, value in result.buffers.items():
                self.add_buffer(module, buffer, value)
            attach_quantization(module, scheme)
            self.keep_buffers(module)  # finished: an abort leaves the layer quantized
        self._log_errors(state, errors)

    def _quantize_layers(self, state: State, names: list[str]) -> dict[str, QuantizedLayer]:
        """Computes the pending layers ``names`` quantized, without changing them.

        Args:
            state: the session's state.
            names: the layers, in plan order.

        Returns:
            Each layer's quantized weight and buffers (round to nearest here).
        """
        return {
            name: quantize_layer(*self._pending[name], self._observers.get(name)) for name in names
        }

    # ---------------------------------------------------------------------- QAT
    def _prepare_training(self) -> None:
        for module, scheme in self._plan.values():
            for buffer, value in training_buffers(module.weight, scheme).items():
                self.add_buffer(module, buffer, value)
            self._quantizers.append(add_weight_fake_quantizer(module, scheme.weights))
            hook = module.register_load_state_dict_pre_hook(self._load_baked_layer)
            self._load_hooks.append(hook)

    def _load_baked_layer(self, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        """Load pre-hook: a checkpoint saved after ``end`` holds the layer baked; bake it too."""
        if bake_weight_saved_baked(module, state_dict, prefix):
            self.keep_buffers(module)
            self._quantizers = [item for item in self._quantizers if item.owner is not module]
            self._baked.append(module)

    def _start_training(self) -> None:
        for quantizer in self._quantizers:
            quantizer.enabled = True
        for module, scheme in self._plan.values():
            if module in self._baked:  # resumed after ``end``: quantized already
                attach_quantization(module, scheme)
                continue
            if _has_static_inputs(scheme):
                tracker = TrainingInputObserver(module, scheme.input_activations)
                self._trackers.append(tracker)
                self.register_hook(module, tracker, "forward_pre", prepend=True)
            self._attach(module, scheme)

    def _set_frozen(self, frozen: bool) -> None:
        for switch in (*self._quantizers, *self._trackers):
            switch.frozen = frozen

    def _finish_training(self, state: State) -> None:
        layers = {name: module for name, (module, _) in self._plan.items()}
        check_finite_weights(type(self).__name__, layers)  # training may have diverged
        errors = {}
        self._remove_load_hooks()
        for name, (module, _) in self._plan.items():
            if module in self._baked:
                continue
            original = module.parametrizations.weight.original
            errors[name] = _relative_error(original, module.weight)
            bake_weight(module)
            for buffer in OBSERVER_BUFFERS:
                module._buffers.pop(buffer, None)
            self.keep_buffers(module)  # finished: an abort leaves the layer quantized
        self._quantizers.clear()
        self._attached.clear()
        self._log_errors(state, errors)

    def _undo_training(self) -> None:
        """Removes what ``_prepare_training`` added: parametrizations and buffers."""
        self._remove_load_hooks()
        for quantizer in self._quantizers:
            bake_weight(quantizer.owner, quantized=False)
        self._quantizers.clear()
        self.remove_buffers()

    def _remove_load_hooks(self) -> None:
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks.clear()

    def _attach(self, module: nn.Module, scheme: QuantizationScheme) -> None:
        attach_quantization(module, scheme)
        self._attached.append(module)

    # ------------------------------------------------------------------ logging
    def _log_errors(self, state: State, errors: dict[str, float]) -> None:
        self.layer_errors.update(errors)
        if state.loggers is not None and errors:
            state.loggers.log_scalars("QuantizationError", errors)


def _has_static_inputs(scheme: QuantizationScheme) -> bool:
    return scheme.input_activations is not None and not scheme.input_activations.dynamic


def _check_group_sizes(owner: str, plan: Plan) -> None:
    bad = {
        f"{name} (in_features={module.in_features})": scheme.weights.group_size
        for name, (module, scheme) in plan.items()
        if scheme.weights.strategy == "group" and module.in_features % scheme.weights.group_size
    }
    if bad:
        sizes = sorted(set(bad.values()))
        raise RecipeError(
            f"{owner}: group_size {sizes} does not divide the input features of "
            f"{list(bad)}; expected a group_size that divides them, or add these layers to ignore"
        )


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    with torch.no_grad():
        return float((weight - quantized).norm() / weight.norm().clamp_min(1e-12))


def _as_list(targets: str | list[str]) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)
