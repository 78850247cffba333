"""A compression session: one lifecycle, its state, and logging."""

from __future__ import annotations

from typing import Any

from loguru import logger

from lightning_compress.core.events import EventType
from lightning_compress.core.helpers import log_model_info, should_log_model_info
from lightning_compress.core.lifecycle import CompressionLifecycle
from lightning_compress.core.logger import BaseLogger, LoggerManager
from lightning_compress.core.state import ModifiedState, State
from lightning_compress.recipe import RecipeArgsInput, RecipeInput, RecipeStageInput

__all__ = ["CompressionSession"]


class CompressionSession:
    """Holds the lifecycle and state of one compression run.

    Sessions are independent: a Trainer's callback owns its own, and the thread-local
    ``active_session()`` is only a convenience for code that has no session at hand.
    """

    def __init__(self) -> None:
        self._lifecycle = CompressionLifecycle()

    @property
    def lifecycle(self) -> CompressionLifecycle:
        """The lifecycle that tracks progress and dispatches events to modifiers."""
        return self._lifecycle

    @property
    def state(self) -> State:
        """The session's state: model, optimizer, data, loggers."""
        return self._lifecycle.state

    def initialize(
        self,
        recipe: RecipeInput | None = None,
        recipe_stage: RecipeStageInput | None = None,
        recipe_args: RecipeArgsInput | None = None,
        model: Any | None = None,
        teacher_model: Any | None = None,
        optimizer: Any | None = None,
        attach_optim_callbacks: bool = True,
        train_data: Any | None = None,
        val_data: Any | None = None,
        test_data: Any | None = None,
        calib_data: Any | None = None,
        copy_data: bool = True,
        start: float | None = None,
        steps_per_epoch: int | None = None,
        batches_per_step: int | None = None,
        loggers: LoggerManager | list[BaseLogger] | None = None,
        **kwargs,
    ) -> ModifiedState:
        """Initialize the session and the recipe's modifiers.

        Args:
            recipe: a recipe path, YAML/JSON string, dict, ``Recipe``, ``Modifier`` or a list.
            recipe_stage: the stage or stages to run; None runs every stage.
            recipe_args: values that override the recipe's ``args``.
            model: the model to compress.
            teacher_model: the teacher for distillation.
            optimizer: the training optimizer.
            attach_optim_callbacks: whether optimizer callbacks are attached.
            train_data: training data.
            val_data: validation data.
            test_data: test data.
            calib_data: calibration data.
            copy_data: deep copy the data sets.
            start: the index the run starts from.
            steps_per_epoch: optimizer steps per epoch (makes schedules epoch based).
            batches_per_step: batches per optimizer step.
            loggers: a ``LoggerManager`` or a list of ``BaseLogger``.
            **kwargs: passed on to the lifecycle and the modifiers.

        Returns:
            The state after initializing, with what the modifiers returned.
        """
        mod_data = self._lifecycle.initialize(
            recipe=recipe,
            recipe_stage=recipe_stage,
            recipe_args=recipe_args,
            model=model,
            teacher_model=teacher_model,
            optimizer=optimizer,
            attach_optim_callbacks=attach_optim_callbacks,
            train_data=train_data,
            val_data=val_data,
            test_data=test_data,
            calib_data=calib_data,
            copy_data=copy_data,
            start=start,
            steps_per_epoch=steps_per_epoch,
            batches_per_step=batches_per_step,
            loggers=loggers,
            **kwargs,
        )
        return self._modified_state(mod_data)

    def finalize(self, **kwargs) -> ModifiedState:
        """Finalize every modifier of the session.

        Args:
            **kwargs: passed to the lifecycle's ``finalize``.

        Returns:
            The state after finalizing, with what the modifiers returned.
        """
        return self._modified_state(self._lifecycle.finalize(**kwargs))

    def event(
        self,
        event_type: EventType,
        batch_data: Any | None = None,
        loss: Any | None = None,
        **kwargs,
    ) -> ModifiedState:
        """Invoke an event.

        Args:
            event_type: the event.
            batch_data: the current batch, if any.
            loss: the loss, required for LOSS_CALCULATED.
            **kwargs: passed to the lifecycle's ``event`` (``global_step``, ``global_batch``,
                ``steps_per_epoch``, ``batches_per_step``, ``subgraph``, ...).

        Returns:
            The state after the event, with what the modifiers returned.
        """
        mod_data = self._lifecycle.event(
            event_type=event_type, batch_data=batch_data, loss=loss, **kwargs
        )
        return self._modified_state(mod_data)

    def reset(self) -> None:
        """Reset the session to its initial state."""
        self._lifecycle.reset()

    def reset_stage(self) -> None:
        """Prepare to run another stage: the model, state and recipe source stay."""
        self.lifecycle.initialized_ = False
        self.lifecycle.finalized = False

    def get_serialized_recipe(self) -> str | None:
        """The recipe being run, as YAML.

        Returns:
            The YAML text, or None when the session has no recipe.
        """
        recipe = self.lifecycle.recipe
        if recipe is not None and hasattr(recipe, "yaml"):
            return recipe.yaml()
        logger.warning("Recipe not found in session - it may have been reset")
        return None

    def log(self, event_type: EventType, loss: Any | None = None) -> None:
        """Log model information (when due) and the loss for ``event_type``.

        Args:
            event_type: the event being logged.
            loss: the loss, logged for LOSS_CALCULATED.
        """
        self._log_model_info()
        self._log_loss(event_type=event_type, loss=loss)

    def _current_log_index(self) -> float:
        steps_per_epoch = self.state.steps_per_epoch
        step = self._lifecycle.global_step
        return step / steps_per_epoch if steps_per_epoch else step

    def _log_model_info(self) -> None:
        current = self._current_log_index()
        if should_log_model_info(
            self.state.model,
            self.state.loggers,
            current,
            self.state._last_log_step,
            self.state.model_log_cadence,
        ):
            log_model_info(self.state, current)
            self.state._last_log_step = current
            self.state.loggers.log_written(current)

    def _log_loss(self, event_type: EventType, loss: Any) -> None:
        if event_type != EventType.LOSS_CALCULATED or loss is None or self.state.loggers is None:
            return
        values = loss if isinstance(loss, dict) else {"loss": loss}
        self.state.loggers.log_scalars("Loss", values, step=self._lifecycle.global_step)

    def _modified_state(self, mod_data: list[Any]) -> ModifiedState:
        return ModifiedState(
            model=self.state.model,
            optimizer=self.state.optimizer,
            loss=self.state.loss,
            modifier_data=mod_data,
        )
