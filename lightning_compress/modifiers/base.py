"""The ``Modifier`` base class: typed settings, scheduling, target resolution, hooks."""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING
from typing import Any, ClassVar

import torch
from loguru import logger
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.model_layer import (
    match_named_modules,
    module_matches,
    normalize_targets,
)
from lightning_compress.core.state import State
from lightning_compress.modifiers.fields import check_value
from lightning_compress.recipe.errors import RecipeError, did_you_mean
from lightning_compress.recipe.registry import register_modifier

__all__ = ["ONE_SHOT", "Modifier"]

# ``start: -1`` marks a one-shot modifier: it runs during calibration (or at finalize
# when no calibration happens), not on the training schedule.
ONE_SHOT = -1.0
# ``end: -1`` means "until training ends".
UNTIL_END = -1.0
# Tolerance for comparing schedule indices, which may be fractional epochs.
_INDEX_TOLERANCE = 1e-9

_HOOK_KINDS = {
    "forward_pre": lambda target, fn, kw: target.register_forward_pre_hook(fn, **kw),
    "forward": lambda target, fn, kw: target.register_forward_hook(fn, **kw),
    "full_backward": lambda target, fn, kw: target.register_full_backward_hook(fn, **kw),
    "optimizer_step_post": lambda target, fn, kw: target.register_step_post_hook(fn),
    "tensor": lambda target, fn, kw: target.register_hook(fn),
}


@dataclasses.dataclass(kw_only=True, eq=False)
class Modifier:
    """Base of every compression algorithm; subclasses declare settings as typed fields.

    Each subclass is made a keyword-only dataclass and registered by class name, so a
    recipe can build it as ``{ClassName: {field: value}}``. Settings are validated on
    construction (types from the hints, ranges in ``validate``); unknown settings are an
    error that lists the valid ones.

    Lifecycle: ``initialize`` → ``on_initialize``; ``update_event`` → ``on_event`` for every
    event (which hands the calibration events to ``on_calibration_start``,
    ``on_sequential_epoch_end`` and ``on_calibration_end``), ``on_start``/``on_end`` when the
    schedule says so and ``on_update`` while active;
    ``finalize`` → ``on_end`` (if still active) and ``on_finalize``; hooks registered with
    ``register_hook`` are removed at finalize, abort, and on any error there.

    Scheduling: ``start``/``end``/``update`` are epochs when the event knows
    ``steps_per_epoch`` (fractions allowed), else optimizer steps. ``start: -1`` makes the
    modifier one-shot: it starts at CALIBRATION_EPOCH_START and ends at
    CALIBRATION_EPOCH_END, or runs both at ``finalize`` if no calibration happened.
    ``end: -1`` (or None) runs until training ends.

    Args:
        targets: class names, module names or ``re:`` regexes of the layers to compress.
        ignore: patterns of layers to leave alone.
        start: when the modifier starts (-1: one-shot).
        end: when it ends (-1 or None: at the end of training).
        update: how often ``on_update`` work is due (None or 0: every step).
        strict: make an ``ignore`` entry that matches no module of the model an error (it
            is a warning otherwise): a misspelled entry would leave its layer compressed.
    """

    targets: str | list[str] = dataclasses.field(default_factory=lambda: ["Linear"])
    ignore: list[str] = dataclasses.field(default_factory=list)
    start: float | None = ONE_SHOT
    end: float | None = None
    update: float | None = None
    strict: bool = False

    _hooks_disabled_globally: ClassVar[int] = 0

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls, kw_only=True, eq=False)
        cls.__init__ = _reject_unknown_settings(cls, cls.__init__)
        if register:
            register_modifier(cls)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            where = f"{type(self).__name__}.{item.name}"
            setattr(self, item.name, check_value(where, getattr(self, item.name), hints[item.name]))
        self._check_schedule()
        self.validate()
        self.initialized_ = False
        self.finalized_ = False
        self.started_ = False
        self.ended_ = False
        self._hooks: list[RemovableHandle] = []
        self._hooks_disabled = False
        self._added_buffers: list[tuple[nn.Module, str]] = []
        self._ignore_checked = False

    # ----------------------------------------------------------------- settings
    def validate(self) -> None:
        """Check value ranges; override and call ``self.fail(field, expected)`` on errors."""

    def join_stage(self, stage: str, modifiers: list[Modifier]) -> None:
        """Settles settings that depend on the other modifiers of the recipe stage.

        Called once the stage is built, on each of its modifiers in order (a
        ``GPTQModifier`` without a scheme takes the one of the ``QuantizationModifier``
        beside it). Nothing by default.

        Args:
            stage: the stage's name.
            modifiers: the stage's modifiers, this one among them.

        Raises:
            RecipeError: when the stage does not give what this modifier needs.
        """

    def fail(self, name: str, expected: str) -> typing.NoReturn:
        """Raise the error for a bad setting.

        Args:
            name: the field's name.
            expected: what was expected, e.g. ``"a float in [0, 1)"``.

        Raises:
            RecipeError: always, naming ``ClassName.field``, the value and ``expected``.
        """
        raise RecipeError(
            f"{type(self).__name__}.{name}: expected {expected}, got {getattr(self, name)!r}"
        )

    def spec(self) -> dict[str, Any]:
        """The settings that differ from their defaults, as plain data.

        Returns:
            ``{field: value}``, suitable for a recipe.
        """
        result = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value != _default_of(item):
                result[item.name] = value
        return result

    @property
    def is_one_shot(self) -> bool:
        """True when the modifier runs once, during calibration or at finalize."""
        return self.start == ONE_SHOT

    @property
    def needs_calibration_data(self) -> bool:
        """True when a one-shot run reads calibration activations (statistics, Hessians).

        ``oneshot(pipeline="auto")`` skips the calibration pass when no modifier needs it.
        """
        return False

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module] | None:
        """The layers inside ``subgraph`` this modifier compresses from their own inputs alone.

        The sequential pipeline calibrates a block in one forward when every modifier can
        say this: it pauses the calibration batches before each group of these layers that
        read one input, emits SEQUENTIAL_EPOCH_END with a subgraph holding just that group
        (the modifier compresses its pending layers inside it and removes their calibration
        hooks), and lets the batches go on through the compressed layers.

        Args:
            subgraph: the block about to be calibrated.

        Returns:
            The layers (empty when the modifier compresses nothing there), or None when it
            needs the whole block calibrated first: the default for an active modifier, which
            may observe the block and expects SEQUENTIAL_EPOCH_END(subgraph=block) only.
        """
        return None if self.active else []

    def skip_block(self, state: State, block: nn.Module) -> None:
        """Forgets the work planned inside ``block``, which an earlier, interrupted run of the
        same recipe compressed and wrote out (a resumed out-of-core run): it is neither
        calibrated nor compressed again, and its weights are not in memory.

        Args:
            state: the session's state.
            block: the finished block.

        Raises:
            NotImplementedError: by default, for an active modifier: one that does not say
                what it keeps per block cannot resume a run.
        """
        if self.active:
            raise NotImplementedError(
                f"{type(self).__name__} cannot resume a run after blocks an earlier run "
                f"finished; remove the unfinished output to compress from the start"
            )

    def _check_schedule(self) -> None:
        if self.start is not None and self.start < 0 and self.start != ONE_SHOT:
            self.fail("start", "an index >= 0, or -1 for one-shot")
        if self.end is not None and self.end < 0 and self.end != UNTIL_END:
            self.fail("end", "an index >= 0, or -1 for the end of training")
        if self.update is not None and self.update < 0:
            self.fail("update", "an interval >= 0")
        has_end = self.end is not None and self.end != UNTIL_END
        if has_end and self.start is not None and not self.is_one_shot and self.end < self.start:
            self.fail("end", f"an index at or after start={self.start}")

    # ---------------------------------------------------------------- lifecycle
    def initialize(self, state: State, **kwargs: Any) -> Any:
        """Prepare the modifier for ``state.model``.

        Args:
            state: the session's state.
            **kwargs: passed to ``on_initialize``.

        Returns:
            What ``on_initialize`` returned.

        Raises:
            RuntimeError: if already initialized or finalized.
        """
        if self.initialized_ or self.finalized_:
            raise RuntimeError(f"{type(self).__name__} was already initialized; create a new one")
        try:
            data = self.on_initialize(state, **kwargs)
        except Exception:
            self.remove_hooks()
            self.remove_buffers()
            raise
        self.initialized_ = True
        return data

    def update_event(self, state: State, event: Event, **kwargs: Any) -> Any:
        """React to one lifecycle event.

        Args:
            state: the session's state.
            event: the event with its step, batch and epoch geometry.
            **kwargs: event data (``loss``, ``batch_data``, ``subgraph``...).

        Returns:
            What ``on_event`` returned.

        Raises:
            RuntimeError: if not initialized, or already finalized.
        """
        if not self.initialized_ or self.finalized_:
            raise RuntimeError(
                f"{type(self).__name__} received {event.type_} while not initialized or "
                f"already finalized"
            )
        with self._cleanup_on_error():
            data = self.on_event(state, event, **kwargs)
            if self.is_one_shot:
                self._one_shot_schedule(state, event, **kwargs)
            else:
                self._training_schedule(state, event, **kwargs)
        return data

    def finalize(self, state: State, **kwargs: Any) -> Any:
        """End the modifier (running a pending one-shot first) and clean up.

        Args:
            state: the session's state.
            **kwargs: passed to ``on_finalize``.

        Returns:
            What ``on_finalize`` returned.

        Raises:
            RuntimeError: if not initialized, or already finalized.
        """
        if not self.initialized_ or self.finalized_:
            raise RuntimeError(f"{type(self).__name__} is not initialized or already finalized")
        try:
            if self.is_one_shot and not self.started_:
                self._start(state, None)
            if self.started_ and not self.ended_:
                self._end(state, None)
            return self.on_finalize(state, **kwargs)
        finally:
            self.remove_hooks()
            self.finalized_ = True

    def abort(self, state: State) -> None:
        """Stop without finishing: remove every hook and every added buffer (except those
        kept with ``keep_buffers``), mark finalized.

        Args:
            state: the session's state.
        """
        self.remove_hooks()
        self.remove_buffers()
        self.finalized_ = True
        logger.debug("{} aborted", type(self).__name__)

    def _one_shot_schedule(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.CALIBRATION_EPOCH_START and not self.started_:
            self._start(state, event, **kwargs)
        elif event.type_ == EventType.CALIBRATION_EPOCH_END and self.started_ and not self.ended_:
            self._end(state, event, **kwargs)

    def _training_schedule(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.BATCH_START and not self.started_ and self.should_start(event):
            self._start(state, event, **kwargs)
        if self.started_ and not self.ended_:
            self.on_update(state, event, **kwargs)
            if event.type_ == EventType.BATCH_END and self.should_end(event):
                self._end(state, event, **kwargs)

    def _start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self.on_start(state, event, **kwargs)
        self.started_ = True

    def _end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self.on_end(state, event, **kwargs)
        self.ended_ = True

    def catch_up(self, state: State, event: Event) -> None:
        """Redo, on a resumed run, the schedule an uninterrupted run went through before ``event``.

        ``event`` is the first BATCH_START after a checkpoint: the modifier starts if ``start``
        was reached by an earlier batch, and ends too if ``end`` was reached by the last
        optimizer step, so what ``on_start``/``on_end`` set up (hooks, switches) is as in an
        uninterrupted run before any modifier acts on ``event``.

        Args:
            state: the session's state (compression state already restored into the model).
            event: the first BATCH_START of the resumed run.
        """
        if self.is_one_shot or self.started_ or event.global_step < 1:
            return
        earlier = event.new_instance(global_step=event.global_step - 1)
        if not self.should_start(earlier):
            return
        self._start(state, earlier)
        reached = event.new_instance(type_=EventType.BATCH_END)
        if self.should_end(reached):
            self._end(state, reached)

    def should_start(self, event: Event) -> bool:
        """Whether a training-scheduled modifier starts at ``event``.

        A run resumed at or after ``end`` still starts (and ends at the same batch), so
        ``on_start``/``on_end`` run exactly as in an uninterrupted run.

        Args:
            event: the current event.

        Returns:
            True when ``start <= index``.
        """
        if self.start is None or self.is_one_shot:
            return False
        return self.start <= event.current_index + _INDEX_TOLERANCE

    def should_end(self, event: Event) -> bool:
        """Whether a training-scheduled modifier ends at ``event``.

        Args:
            event: the current event.

        Returns:
            True when ``end`` is set (not -1) and reached.
        """
        if self.end is None or self.end == UNTIL_END:
            return False
        return event.current_index >= self.end - _INDEX_TOLERANCE

    def update_due(self, event: Event) -> bool:
        """Whether periodic work is due at ``event``: inside ``[start, end]``, on the grid
        ``start + k·update`` (every event when ``update`` is None or 0).

        Args:
            event: the current event.

        Returns:
            True when an update is due.
        """
        start = 0.0 if self.is_one_shot or self.start is None else self.start
        end = None if self.end == UNTIL_END else self.end
        current = event.current_index
        if current < start - _INDEX_TOLERANCE:
            return False
        if end is not None and current > end + _INDEX_TOLERANCE:
            return False
        if not self.update:
            return True
        intervals = (current - start) / self.update
        return abs(intervals - round(intervals)) * self.update < _INDEX_TOLERANCE

    def resolve_targets(
        self, model: nn.Module, targets: str | list[str] | None = None
    ) -> dict[str, nn.Module]:
        """The modules of ``model`` this modifier acts on.

        Args:
            model: the model.
            targets: patterns to use instead of ``self.targets`` (``ignore`` still applies).

        Returns:
            The modules selected by ``targets`` and not by ``ignore``, by name.

        Raises:
            RecipeError: if the targets match nothing, or ``ignore`` removes every module
                they match (the modifier would compress nothing), or (with ``strict``) an
                ``ignore`` entry matches no module of ``model``.

        An ``ignore`` entry that matches no module of ``model`` (a likely typo) is named in
        a warning, once per modifier, or in the error with ``strict``.
        """
        owner = type(self).__name__
        patterns = targets or self.targets
        try:
            layers = match_named_modules(model, patterns, self.ignore)
        except ValueError as err:
            raise RecipeError(f"{owner}.targets: {err}") from err
        self.check_ignore(model)
        if not layers:
            selected = list(match_named_modules(model, patterns))
            raise RecipeError(
                f"{owner}.ignore: {self.ignore} removes every module that targets "
                f"{normalize_targets(patterns)} select in {type(model).__name__} "
                f"({_summary(selected)}), so {owner} would compress nothing; expected "
                f"at least one targeted module left (narrow ignore or targets, or remove {owner} "
                "from the recipe)"
            )
        return layers

    def check_ignore(self, model: nn.Module, strict: bool = False) -> None:
        """Names the ``ignore`` entries that match no module of ``model`` (a likely typo): a
        warning each, once per modifier, or one error with ``strict`` or ``self.strict``.

        Args:
            model: the model.
            strict: make it an error whatever ``self.strict`` says (a run's own switch).

        Raises:
            RecipeError: with ``strict`` or ``self.strict``, when an entry matches no module.
        """
        strict = strict or self.strict
        if self._ignore_checked and not strict:
            return
        _check_unmatched_ignore(type(self).__name__, model, self.ignore, strict)
        self._ignore_checked = True

    def compression_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose weights this modifier compresses, found without changing ``model``.

        The coverage check asks every modifier of a recipe for these before any of them
        initializes (``strict=True`` refuses a recipe that leaves a weight out).

        Args:
            model: the model.

        Returns:
            The layers by name; none for modifiers that compress no weight (smoothing,
            distillation).

        Raises:
            RecipeError: for targets or ``ignore`` patterns the modifier refuses.
        """
        return {}

    # ------------------------------------------------------- subclass callbacks
    def on_initialize(self, state: State, **kwargs: Any) -> Any:
        """Prepare for ``state.model`` (resolve targets, check settings against it)."""

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        """Begin compressing (``event`` is None when started from ``finalize``)."""

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        """Periodic work while active, called for every event between start and end."""

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        """Finish compressing (``event`` is None when ended from ``finalize``)."""

    def on_event(self, state: State, event: Event, **kwargs: Any) -> Any:
        """Any event, before the schedule is applied.

        By default it hands the calibration events to the named hooks below, so an
        algorithm overrides those instead of testing ``event.type_``.

        Args:
            state: the session's state.
            event: the event.
            **kwargs: event data (``subgraph`` for SEQUENTIAL_EPOCH_END).

        Returns:
            What the named hook returned (None for other events).
        """
        if event.type_ == EventType.CALIBRATION_EPOCH_START:
            return self.on_calibration_start(state, event)
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
            return self.on_sequential_epoch_end(state, kwargs.get("subgraph"))
        if event.type_ == EventType.CALIBRATION_EPOCH_END:
            return self.on_calibration_end(state, event)
        return None

    def on_calibration_start(self, state: State, event: Event) -> None:
        """CALIBRATION_EPOCH_START, before a one-shot modifier's ``on_start``."""

    def on_sequential_epoch_end(self, state: State, subgraph: nn.Module | None) -> None:
        """SEQUENTIAL_EPOCH_END: the pipeline has calibrated ``subgraph`` (a block, or the
        layers of a block that read one input; see :meth:`staged_layers`)."""

    def on_calibration_end(self, state: State, event: Event) -> None:
        """CALIBRATION_EPOCH_END, before a one-shot modifier's ``on_end``."""

    def on_finalize(self, state: State, **kwargs: Any) -> Any:
        """Last chance to clean up; hooks are removed right after."""

    def modify_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        """Change the training loss (e.g. add a distillation term); identity by default.

        Called only while the modifier is active, through the documented opt-in line
        ``loss = compression_loss(self, loss)`` in a ``training_step``.

        Args:
            state: the session's state.
            loss: the loss computed by the user's ``training_step``.

        Returns:
            The loss to back-propagate.
        """
        return loss

    @property
    def active(self) -> bool:
        """True between start and end."""
        return self.started_ and not self.ended_

    # ------------------------------------------------------------------ buffers
    def add_buffer(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """Add compression state (a mask, a scale) to ``module`` as a buffer.

        Buffers travel with the module's ``state_dict``, so Lightning checkpoints, shards and
        restores them like weights. Buffers added here are removed by ``remove_buffers`` and
        when the modifier aborts, unless ``keep_buffers`` made them part of the model.

        Args:
            module: the module to hold the buffer.
            name: the buffer's name (e.g. ``weight_mask``).
            value: its initial value.

        Raises:
            ValueError: if ``module`` already has a parameter, buffer or attribute ``name``
                that this modifier did not add.
        """
        if (module, name) in self._added_buffers:
            module._buffers[name] = value
            return
        if hasattr(module, name):
            raise ValueError(
                f"{type(module).__name__} already has an attribute '{name}' (does another "
                f"modifier of this stage target the same layer?)"
            )
        module.register_buffer(name, value)
        self._added_buffers.append((module, name))

    def remove_buffers(self) -> None:
        """Remove every buffer this modifier added (and did not keep)."""
        for module, name in self._added_buffers:
            module._buffers.pop(name, None)
        self._added_buffers.clear()

    def keep_buffers(self, module: nn.Module) -> None:
        """Make the buffers added to ``module`` part of the model: neither ``remove_buffers``
        nor ``abort`` removes them afterwards.

        For a layer whose compression has finished (its scales and zero points): a later
        failure of the calibration leaves the layer consistently compressed.

        Args:
            module: the module holding the buffers.
        """
        self._added_buffers = [(m, name) for m, name in self._added_buffers if m is not module]

    # -------------------------------------------------------------------- hooks
    def register_hook(
        self, target: Any, hook: Callable[..., Any], kind: str, **kwargs: Any
    ) -> RemovableHandle:
        """Register a hook that this modifier owns and removes at finalize or on error.

        Args:
            target: a module, optimizer or tensor.
            hook: the hook function.
            kind: ``forward_pre``, ``forward``, ``full_backward``, ``optimizer_step_post`` or
                ``tensor``.
            **kwargs: passed to the module's registration method (e.g. ``with_kwargs``).

        Returns:
            The handle.

        Raises:
            ValueError: for an unknown ``kind``.
        """
        if kind not in _HOOK_KINDS:
            raise ValueError(
                f"hook kind '{kind}' is not known; expected one of {list(_HOOK_KINDS)}"
            )

        @functools.wraps(hook)
        def guarded(*args: Any, **hook_kwargs: Any) -> Any:
            if self._hooks_disabled or Modifier._hooks_disabled_globally:
                return None
            return hook(*args, **hook_kwargs)

        handle = _HOOK_KINDS[kind](target, guarded, kwargs)
        self._hooks.append(handle)
        return handle

    def remove_hooks(self) -> None:
        """Remove every hook this modifier registered."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @property
    def num_hooks(self) -> int:
        """How many hooks this modifier currently has registered."""
        return len(self._hooks)

    @contextmanager
    def hooks_disabled(self) -> Iterator[None]:
        """Disable this modifier's hooks inside the context."""
        previous, self._hooks_disabled = self._hooks_disabled, True
        try:
            yield
        finally:
            self._hooks_disabled = previous

    @classmethod
    @contextmanager
    def disable_hooks(cls) -> Iterator[None]:
        """Disable the hooks of every modifier inside the context."""
        Modifier._hooks_disabled_globally += 1
        try:
            yield
        finally:
            Modifier._hooks_disabled_globally -= 1

    @contextmanager
    def _cleanup_on_error(self) -> Iterator[None]:
        try:
            yield
        except Exception:
            self.remove_hooks()
            raise


def _check_unmatched_ignore(owner: str, model: nn.Module, ignore: list[str], strict: bool) -> None:
    """Names the ``ignore`` entries that match no module of ``model``: a warning each, or one
    error with ``strict``, with the closest module names or classes.

    Raises:
        RecipeError: with ``strict``, when an entry matches no module.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    unmatched = [
        pattern
        for pattern in ignore
        if not any(module_matches(name, module, pattern) for name, module in named)
    ]
    if not unmatched:
        return
    candidates = dict.fromkeys(
        [name for name, _ in named] + [type(module).__name__ for _, module in named]
    )
    model_name = type(model).__name__
    if strict:
        raise RecipeError(
            f"{owner}.ignore: {unmatched} match no module of {model_name} (strict=True); "
            "expected module names, class names or 're:' patterns of its modules"
            + did_you_mean(unmatched, candidates)
        )
    for pattern in unmatched:
        hint = did_you_mean([pattern], candidates).removeprefix(";")
        logger.warning(
            "{}.ignore: '{}' matches no module of {}; it ignores nothing (a typo?{}); "
            "strict=True makes this an error",
            owner,
            pattern,
            model_name,
            hint,
        )


def _summary(names: list[str]) -> str:
    """``names`` shortened for a message: the first few and how many there are."""
    shown = ", ".join(names[:3])
    return f"{shown}, ... {len(names)} in all" if len(names) > 3 else shown


def _reject_unknown_settings(cls: type, init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a dataclass ``__init__`` so unknown settings list the valid ones and the closest."""
    valid = [item.name for item in dataclasses.fields(cls)]
    required = [item.name for item in dataclasses.fields(cls) if _default_of(item) is MISSING]

    @functools.wraps(init)
    def __init__(self: Modifier, *args: Any, **kwargs: Any) -> None:
        if args:
            raise RecipeError(f"{cls.__name__} takes settings by keyword only, got {args!r}")
        unknown = [key for key in kwargs if key not in valid]
        if unknown:
            raise RecipeError(
                f"{cls.__name__}: unknown setting(s) {unknown}; valid settings: {valid}"
                + did_you_mean(unknown, valid)
            )
        missing = [key for key in required if key not in kwargs]
        if missing:
            raise RecipeError(f"{cls.__name__}: missing required setting(s) {missing}")
        init(self, **kwargs)

    return __init__


def _default_of(item: dataclasses.Field) -> Any:
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    return MISSING
