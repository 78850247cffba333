"""``QuantizationModifier``: weight and activation quantization, one-shot or trained (QAT)."""

from __future__ import annotations

from typing import Any, ClassVar

from loguru import logger
from torch import nn

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import ONE_SHOT
from lightning_compress.modifiers.layerwise_modifier import PendingLayer
from lightning_compress.modifiers.quantization.args import QuantizationScheme
from lightning_compress.modifiers.quantization.kv_cache_training import AttentionTraining
from lightning_compress.modifiers.quantization.oneshot import LayerwiseQuantization
from lightning_compress.modifiers.quantization.schemes import has_static_inputs
from lightning_compress.modifiers.quantization.training import QuantizationTraining

__all__ = ["QuantizationModifier"]

TRAINING_INPUT_OBSERVERS = ("minmax", "moving_average")


class QuantizationModifier(LayerwiseQuantization):
    """Quantizes the weights and input activations of targeted ``nn.Linear`` layers, and the
    tables of targeted ``nn.Embedding`` layers (weights only, as a ``Linear`` weight
    ``[out, in]``: see :mod:`~lightning_compress.modifiers.quantization.embedding`).

    It picks its mode at ``initialize``: round-to-nearest through the layer-wise flow of
    :class:`~lightning_compress.modifiers.quantization.oneshot.LayerwiseQuantization`, or
    :class:`~lightning_compress.modifiers.quantization.training.QuantizationTraining`.

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

    A ``GPTQModifier`` of the same recipe stage given no scheme takes this modifier's schemes
    (llm-compressor's meaning): it quantizes their ``Linear`` layers with GPTQ, and this
    modifier the rest (e.g. an ``Embedding``) and the KV cache.

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
        kv_cache_scheme: fp8 arguments of the keys and values of every attention module
            (``strategy: tensor`` or ``attn_head``): calibrated one-shot, or observed on every
            training forward (see :mod:`~lightning_compress.modifiers.quantization.kv_cache`).
        start: -1 for one-shot, else when quantization-aware training starts.
        end: when quantization-aware training ends and weights are baked (-1 or None: at
            the end of training).
        freeze_observers: quantization-aware training only: the index (epochs or steps, like
            ``start``) from which weight qparams and static input ranges stop changing.
        learnable_scales: quantization-aware training only: train the weight scales with the
            model (LSQ, symmetric weights only; see
            :mod:`~lightning_compress.modifiers.quantization.learnable`) instead of following
            the weight's min-max. Under DDP, ``start > 0``, ``freeze_observers`` or an
            ``end`` before training ends need ``find_unused_parameters=True``.
        quantize_activations_in_calibration: one-shot: whether the calibration forwards run
            quantized layers with their inputs (and keys/values) quantized; False: unquantized
            until calibration ends, as llm-compressor does (see ``LayerwiseQuantization``).
    """

    start: float | None = ONE_SHOT
    freeze_observers: float | None = None
    learnable_scales: bool = False

    lends_stage_schemes: ClassVar[bool] = True
    quantizes_embeddings: ClassVar[bool] = True

    # ----------------------------------------------------------------- settings
    def validate(self) -> None:
        if self.start is None:
            self.fail("start", "-1 (one-shot) or an index >= 0 (quantization-aware training)")
        if self.freeze_observers is not None:
            if self.is_one_shot:
                self.fail("freeze_observers", "None for one-shot quantization (start=-1)")
            if self.freeze_observers <= self.start:
                self.fail("freeze_observers", f"an index after start={self.start}")
        if self.learnable_scales and self.is_one_shot:
            self.fail("learnable_scales", "false for one-shot quantization (start=-1)")
        super().validate()

    @property
    def needs_calibration_data(self) -> bool:
        """True when a scheme has static input activations or attention states (their ranges
        are calibrated)."""
        static_inputs = any(map(has_static_inputs, self.resolved_schemes()))
        attention = self.kv_cache_scheme is not None or bool(self._attention_groups())
        return self.is_one_shot and (static_inputs or attention)

    def _check_scheme(self, where: str, scheme: QuantizationScheme) -> None:
        super()._check_scheme(where, scheme)
        if self.is_one_shot:
            return
        if scheme.weights.observer != "minmax":
            raise self.bad_scheme(
                where,
                "weights.observer",
                "'minmax' for quantization-aware training (weight qparams follow the weight)",
                scheme.weights.observer,
            )
        if self.learnable_scales and not scheme.weights.symmetric:
            raise self.bad_scheme(
                where,
                "weights.symmetric",
                "true with learnable_scales (a learned zero point is not supported)",
                scheme.weights.symmetric,
            )
        inputs = scheme.input_activations
        if has_static_inputs(scheme) and inputs.observer not in TRAINING_INPUT_OBSERVERS:
            raise self.bad_scheme(
                where,
                "input_activations.observer",
                f"one of {list(TRAINING_INPUT_OBSERVERS)} for quantization-aware training",
                inputs.observer,
            )

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self._training: QuantizationTraining | None = None
        self._attention_training: AttentionTraining | None = None
        super().on_initialize(state, **kwargs)
        _warn_about_actorder(self._plan)
        if not self.is_one_shot:
            plan = self.attention_plan(state.model)
            self._attention_training = AttentionTraining(self, plan) if plan else None
            self._training = QuantizationTraining(
                self, self._plan, self.freeze_observers, self.learnable_scales
            )

    @property
    def _mode(self) -> Any:
        """The mode picked at ``initialize``: training, or the one-shot flow of the base."""
        training = getattr(self, "_training", None)
        return super() if training is None else training

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self._mode.on_start(state, event, **kwargs)
        if self._attention_training is not None:
            try:
                self._attention_training.start()
            except BaseException:
                self._attention_training.close()
                raise

    def on_sequential_epoch_end(self, state: State, subgraph: nn.Module | None) -> None:
        self._mode.on_sequential_epoch_end(state, subgraph)

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module] | None:
        """The pending layers inside ``subgraph`` (none outside a one-shot calibration).

        Args:
            subgraph: the block about to be calibrated.

        Returns:
            The layers each quantized from its own inputs.
        """
        return self._mode.staged_layers(subgraph)

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        self._mode.on_update(state, event, **kwargs)
        attention = self._attention_training
        freezes = self.freeze_observers is not None and event.type_ == EventType.BATCH_START
        if attention is not None and freezes:
            # should_update with only a start: "has the index reached freeze_observers?"
            attention.frozen = event.should_update(self.freeze_observers, None, None)

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self._mode.on_end(state, event, **kwargs)
        if self._attention_training is not None:
            self._attention_training.end()

    def on_finalize(self, state: State, **kwargs: Any) -> None:
        self._mode.on_finalize(state, **kwargs)
        if self._attention_training is not None:
            if self.started_:
                self._attention_training.close()
            else:  # training ended before start: the model is left unquantized
                self._attention_training.undo()

    def abort(self, state: State) -> None:
        """Stop without finishing: undo what this modifier added to the model.

        Removes the calibration hooks and observers, and for quantization-aware training the
        quantized forward, the parametrizations and buffers. Layers already quantized one-shot
        stay quantized with their qparams and quantized forward, so the model stays
        consistent (the pipeline records which blocks are).

        Args:
            state: the session's state.
        """
        if getattr(self, "_attention_training", None) is not None:
            self._attention_training.undo()
        if getattr(self, "_training", None) is not None:
            self._training.undo()
        super().abort(state)


def _warn_about_actorder(plan: dict[str, PendingLayer]) -> None:
    """Says that ``weights.actorder`` (a GPTQ setting) does nothing for the layers
    round-to-nearest or quantization-aware training quantize, naming one."""
    ordered = [name for name, layer in plan.items() if layer.settings.weights.actorder is not None]
    if ordered:
        logger.warning(
            "QuantizationModifier: weights.actorder={!r} orders GPTQ's columns; round-to-nearest "
            "and quantization-aware training ignore it ({} layers, e.g. '{}'); quantize them "
            "with GPTQModifier to use it",
            plan[ordered[0]].settings.weights.actorder,
            len(ordered),
            ordered[0],
        )
