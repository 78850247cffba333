"""The compression lifecycle: initialize the recipe's modifiers, dispatch events, finalize."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.layers import Linearization, linearize
from lightning_compress.recipe import Recipe, RecipeArgsInput, RecipeInput, RecipeStageInput

__all__ = ["CompressionLifecycle"]

TRAINING_EVENT_ORDER = [
    EventType.BATCH_START,
    EventType.LOSS_CALCULATED,
    EventType.OPTIM_PRE_STEP,
    EventType.OPTIM_POST_STEP,
    EventType.BATCH_END,
]
# Several optimizers (or losses) per batch: another loss or step may follow a step.
_REPEATABLE_AFTER_STEP = (EventType.LOSS_CALCULATED, EventType.OPTIM_PRE_STEP)


@dataclass
class CompressionLifecycle:
    """Runs a recipe's modifiers through initialize → events → finalize.

    Args:
        state: the compression state shared with the modifiers.
        recipe: the recipe whose modifiers are run.
        initialized_: whether ``initialize`` has run.
        finalized: whether ``finalize`` has run.
        global_step: optimizer steps taken (advanced by OPTIM_POST_STEP unless given).
        global_batch: batches seen (advanced by BATCH_END unless given).
    """

    state: State = field(default_factory=State)
    recipe: Recipe = field(default_factory=Recipe)
    initialized_: bool = False
    finalized: bool = False
    _last_event_type: EventType | None = EventType.BATCH_END
    _event_order: list[EventType] = field(default_factory=lambda: list(TRAINING_EVENT_ORDER))
    global_step: int = 0
    global_batch: int = 0
    _recipe_source: RecipeInput | None = None

    def initialize(
        self,
        recipe: RecipeInput | None = None,
        recipe_stage: RecipeStageInput | None = None,
        recipe_args: RecipeArgsInput | None = None,
        **kwargs,
    ) -> list[Any]:
        """Update the state, build the recipe and initialize its modifiers.

        A second call only updates the state. After ``reset_stage`` the recipe given
        before is reused, so ``initialize(recipe_stage=next_stage)`` runs the next stage.
        First every weight matrix of the state's model that is not an ``nn.Linear`` layer
        (fused experts, ``Conv1D``) is swapped for ``nn.Linear`` layers (see
        ``lightning_compress.layers.linearize``), so modifiers' targets reach it. If that,
        building the recipe or initializing a modifier fails, the swap and the modifiers
        already initialized are undone and the lifecycle, its state and the model are left
        as they were.

        Args:
            recipe: a recipe (path, YAML/JSON string, dict, ``Recipe``, ``Modifier`` or list).
            recipe_stage: the stage or stages to run; None runs every stage.
            recipe_args: values for the recipe's ``args`` (``${args.name}`` interpolation).
            **kwargs: passed to ``State.update`` and to each modifier's ``initialize``.

        Returns:
            The non-None values returned by the modifiers.
        """
        snapshot = _snapshot(self.state)
        self.state.update(**kwargs)
        if self.initialized_:
            return []

        logger.debug("Initializing compression lifecycle")
        source = recipe if recipe is not None else self._recipe_source
        swapped = Linearization()
        try:
            if self.state.model is not None:
                swapped = linearize(self.state.model)
            new_recipe = (
                Recipe()
                if source is None
                else Recipe.create_instance(
                    source, target_stage=recipe_stage, recipe_args=recipe_args
                )
            )
            mod_data = _initialize_all(new_recipe.modifiers, self.state, kwargs)
        except Exception:
            swapped.undo()
            _restore(self.state, snapshot)
            raise
        self.recipe = new_recipe
        self._recipe_source = source
        self.initialized_ = True
        self.finalized = False
        self._last_event_type = EventType.BATCH_END
        logger.info(
            "Compression lifecycle initialized for {} modifiers", len(self.recipe.modifiers)
        )
        return mod_data

    def event(
        self,
        event_type: EventType,
        global_step: int | None = None,
        global_batch: int | None = None,
        **kwargs,
    ) -> list[Any]:
        """Dispatch one event to every modifier.

        The ``Event`` handed to the modifiers carries ``global_step``, ``global_batch``,
        ``steps_per_epoch`` and ``batches_per_step``, so step and epoch schedules run.
        When the caller gives no step, the lifecycle counts: OPTIM_POST_STEP advances
        ``global_step`` and BATCH_END advances ``global_batch`` after dispatch.

        Args:
            event_type: the event.
            global_step: optimizer steps taken so far; None uses the lifecycle's count.
            global_batch: batches seen so far; None uses the lifecycle's count.
            **kwargs: passed to the modifiers; ``loss`` is required for LOSS_CALCULATED,
                ``steps_per_epoch``/``batches_per_step`` update the state.

        Returns:
            The non-None values returned by the modifiers.

        Raises:
            ValueError: before ``initialize``, after ``finalize``, for INITIALIZE/FINALIZE,
                for training events out of order, or LOSS_CALCULATED without a loss.
        """
        self._check_event(event_type, kwargs)
        logger.trace("Handling event: {}", event_type)
        for name in ("steps_per_epoch", "batches_per_step"):
            if kwargs.get(name) is not None:
                setattr(self.state, name, kwargs.pop(name))
        if global_step is not None:
            self.global_step = global_step
        if global_batch is not None:
            self.global_batch = global_batch

        event = Event(
            type_=event_type,
            steps_per_epoch=self.state.steps_per_epoch,
            batches_per_step=self.state.batches_per_step,
            global_step=self.global_step,
            global_batch=self.global_batch,
        )
        if "loss" in kwargs:
            self.state.loss = kwargs["loss"]
        if "batch_data" in kwargs and kwargs["batch_data"] is not None:
            self.state.batch_data = kwargs["batch_data"]
        mod_data = []
        for mod in self.recipe.modifiers:
            data = mod.update_event(state=self.state, event=event, **kwargs)
            if data is not None:
                mod_data.append(data)

        if event_type == EventType.OPTIM_POST_STEP and global_step is None:
            self.global_step += 1
        if event_type == EventType.BATCH_END and global_batch is None:
            self.global_batch += 1
        return mod_data

    def finalize(self, **kwargs) -> list[Any]:
        """Finalize every modifier.

        Args:
            **kwargs: passed to each modifier's ``finalize``.

        Returns:
            The non-None values returned by the modifiers.

        Raises:
            ValueError: before ``initialize`` or when called twice.
        """
        if not self.initialized_:
            logger.error("Cannot finalize before initializing")
            raise ValueError("Cannot finalize before initializing: call initialize() first")
        if self.finalized:
            logger.error("Cannot finalize more than once")
            raise ValueError(
                "Cannot finalize more than once: call reset_stage() and initialize() "
                "to run another stage"
            )
        logger.debug("Finalizing compression lifecycle")
        mod_data = []
        for mod in self.recipe.modifiers:
            if mod.finalized_:
                continue
            data = mod.finalize(state=self.state, **kwargs)
            if data is not None:
                mod_data.append(data)
        self.finalized = True
        logger.info("Compression lifecycle finalized for {} modifiers", len(self.recipe.modifiers))
        return mod_data

    def reset(self) -> None:
        """Finalize any active modifier and return every attribute to its default."""
        logger.debug("Resetting compression lifecycle")
        for mod in self.recipe.modifiers:
            if not mod.initialized_ or mod.finalized_:
                continue
            try:
                mod.finalize(self.state)
            except Exception as err:  # a reset must always complete
                logger.warning("Exception during finalizing modifier {}: {}", mod, err)
        self.__init__()
        logger.info("Compression lifecycle reset")

    def abort(self) -> None:
        """Stop every unfinished modifier after a failure: its hooks and buffers are removed."""
        for mod in self.recipe.modifiers:
            if mod.initialized_ and not mod.finalized_:
                mod.abort(self.state)

    def _check_event(self, event_type: EventType, kwargs: dict[str, Any]) -> None:
        if not self.initialized_:
            logger.error("Cannot invoke event before initializing")
            raise ValueError("Cannot invoke event before initializing: call initialize() first")
        if self.finalized:
            logger.error("Cannot invoke event after finalizing")
            raise ValueError(
                "Cannot invoke event after finalizing: call reset_stage() and initialize() "
                "to run another stage"
            )
        if event_type in (EventType.INITIALIZE, EventType.FINALIZE):
            logger.error(
                "Cannot invoke {} event. Use the corresponding method instead.", event_type
            )
            raise ValueError(
                f"Cannot invoke {event_type} event. Use the corresponding method instead "
                f"(initialize() or finalize())."
            )
        if event_type == EventType.LOSS_CALCULATED and kwargs.get("loss") is None:
            logger.error("Loss must be provided for loss calculated event")
            raise ValueError(
                "Loss must be provided for loss calculated event: pass loss=<the loss tensor>"
            )
        if not self._validate_event_order(event_type):
            raise ValueError(
                f"Lifecycle events must appear following order: {self._event_order}. "
                f"Instead, {self._last_event_type} was called before {event_type}"
            )

    def _validate_event_order(self, event_type: EventType) -> bool:
        if event_type not in self._event_order:
            return True  # calibration events are not ordered against training events
        last = self._last_event_type
        if event_type == EventType.BATCH_START:
            valid = last != EventType.BATCH_START
        elif last == EventType.OPTIM_POST_STEP and event_type in _REPEATABLE_AFTER_STEP:
            valid = True
        else:
            valid = self._event_order.index(last) <= self._event_order.index(event_type)
        if valid:
            self._last_event_type = event_type
        return valid


def _initialize_all(modifiers: list, state: State, kwargs: dict[str, Any]) -> list[Any]:
    """Initialize each modifier; on failure undo the ones already initialized."""
    done = []
    mod_data = []
    try:
        for mod in modifiers:
            data = mod.initialize(state=state, **kwargs)
            done.append(mod)
            if data is not None:
                mod_data.append(data)
    except Exception:
        for mod in reversed(done):
            mod.abort(state)
        raise
    return mod_data


def _snapshot(state: State) -> dict[str, Any]:
    values = dict(vars(state))
    values["data"] = copy.copy(state.data)
    values["hardware"] = copy.copy(state.hardware)
    return values


def _restore(state: State, snapshot: dict[str, Any]) -> None:
    vars(state).update(snapshot)
