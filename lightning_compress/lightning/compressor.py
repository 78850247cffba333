"""``Compressor``: a Lightning callback that runs a compression recipe while a model trains."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_compress.core import CompressionSession, EventType, LoggerManager, model_sparsity
from lightning_compress.lightning.loggers import TrainerLogger
from lightning_compress.recipe import (
    Recipe,
    RecipeArgsInput,
    RecipeError,
    RecipeStageInput,
)

__all__ = ["Compressor", "compression_loss"]


def compression_loss(pl_module: pl.LightningModule, loss: torch.Tensor) -> torch.Tensor:
    """Let the active modifiers of every ``Compressor`` change the loss (e.g. distillation).

    The one line a ``training_step`` adds to opt in: ``loss = compression_loss(self, loss)``.

    Args:
        pl_module: the LightningModule being trained.
        loss: the task loss.

    Returns:
        The loss to back-propagate (unchanged when no modifier changes losses).
    """
    for callback in pl_module.trainer.callbacks:
        if isinstance(callback, Compressor):
            loss = callback.modify_loss(loss)
    return loss


class Compressor(Callback):
    """Compress any LightningModule while it trains, following a recipe.

    The callback owns a ``CompressionSession`` and turns Lightning hooks into lifecycle events:
    ``setup`` builds the recipe and lets modifiers create their buffers (before a checkpoint
    is restored), ``on_train_start`` hands over the optimizer and the epoch geometry, each
    batch emits BATCH_START, LOSS_CALCULATED, OPTIM_PRE_STEP, OPTIM_POST_STEP (from an
    optimizer step post-hook, so a step skipped by AMP's GradScaler emits nothing) and
    BATCH_END, and ``on_train_end`` finalizes.

    Args:
        recipe: the recipe (path, YAML/JSON text, dict, modifiers: any ``RecipeInput``; typed
            ``Any`` so LightningCLI passes YAML mappings through unchanged); None runs no
            modifier (useful to measure the callback's own overhead).
        recipe_stage: the stage or stages to run; None runs all.
        recipe_args: values for the recipe's ``${args.name}`` interpolations.
        teacher: a teacher model for distillation modifiers.
        model_log_cadence: how often (in epochs, or steps when the epoch length is unknown)
            per-layer sparsity is logged to the Trainer's loggers.
        save_dir: when training ends (after finalize, on rank 0), save the model the
            LightningModule holds (a transformers model or the bundled TinyDecoder) here as a
            compressed-tensors checkpoint with the recipe (``save_compressed``; needs the
            ``hf`` extra). It must not exist or be empty; that is checked at ``setup``.
    """

    def __init__(
        self,
        recipe: Any = None,
        recipe_stage: RecipeStageInput | None = None,
        recipe_args: RecipeArgsInput | None = None,
        teacher: nn.Module | None = None,
        model_log_cadence: float | None = None,
        save_dir: str | os.PathLike | None = None,
    ) -> None:
        self.recipe = recipe
        self.recipe_stage = recipe_stage
        self.recipe_args = recipe_args
        self.teacher = teacher
        self.model_log_cadence = model_log_cadence
        self.save_dir = save_dir
        self.session = CompressionSession()
        self._optimizer_hooks: list[Any] = []
        self._global_batch = 0
        self._last_post_step: tuple[int, int] | None = None

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.session.lifecycle.initialized_:
            return
        if self.save_dir is not None:  # on every rank, so that all of them stop alike
            from lightning_compress.export import check_output_dir  # the optional hf extra

            check_output_dir(self.save_dir, overwrite=False)
        recipe = (
            Recipe()
            if self.recipe is None
            else Recipe.create_instance(
                self.recipe, target_stage=self.recipe_stage, recipe_args=self.recipe_args
            )
        )
        _check_trainable(recipe)
        self.session.initialize(
            recipe=recipe,
            model=pl_module,
            teacher_model=self.teacher,
            loggers=LoggerManager([TrainerLogger(trainer)], log_python=False),
            model_log_cadence=self.model_log_cadence,
            copy_data=False,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if self.teacher is not None:
            self.teacher.to(pl_module.device).eval()
        self.session.initialize(
            optimizer=optimizers[0] if len(optimizers) == 1 else optimizers,
            steps_per_epoch=_steps_per_epoch(trainer, pl_module),
            batches_per_step=trainer.accumulate_grad_batches,
            start=trainer.current_epoch,
        )
        self._optimizer_hooks = [
            optimizer.register_step_post_hook(self._on_optimizer_step) for optimizer in optimizers
        ]
        rank_zero_info(f"Compressor: {self._summary()}")

    # --------------------------------------------------------------- training
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_batch = trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1
        self._event(trainer, EventType.BATCH_START, batch_data=batch)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any
    ) -> None:
        self._event(trainer, EventType.LOSS_CALCULATED, loss=loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._event(trainer, EventType.OPTIM_PRE_STEP, optimizer=optimizer)

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        trainer = self.session.state.model.trainer
        # Fire once per (optimizer, step), whatever wraps the optimizer's step.
        key = (id(optimizer), trainer.global_step)
        if key == self._last_post_step:
            return
        self._last_post_step = key
        self._event(trainer, EventType.OPTIM_POST_STEP, optimizer=optimizer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._event(trainer, EventType.BATCH_END)
        self.session.log(EventType.BATCH_END)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_optimizer_hooks()
        if self.session.lifecycle.initialized_ and not self.session.lifecycle.finalized:
            self.session.finalize()
            rank_zero_info(f"Compressor finished: {self._sparsity_line(pl_module)}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        finished = self.session.lifecycle.finalized
        if self.save_dir is not None and trainer.is_global_zero and finished:
            from lightning_compress.export import save_compressed  # the optional hf extra

            save_compressed(pl_module, self.save_dir, recipe=self.session.get_serialized_recipe())

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_optimizer_hooks()
        self.session.lifecycle.abort()

    def modify_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Pass ``loss`` through every active modifier's ``modify_loss``.

        Args:
            loss: the task loss.

        Returns:
            The modified loss.
        """
        state = self.session.state
        for modifier in self.session.lifecycle.recipe.modifiers:
            if modifier.active:
                loss = modifier.modify_loss(state, loss)
        return loss

    # ------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        lifecycle = self.session.lifecycle
        return {
            "recipe": self.session.get_serialized_recipe() if lifecycle.initialized_ else None,
            "global_step": lifecycle.global_step,
            "global_batch": lifecycle.global_batch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("recipe")
        current = self.session.get_serialized_recipe()
        if saved is not None and self.session.lifecycle.initialized_ and saved != current:
            raise RecipeError(
                "the checkpoint was trained with a different recipe than this Compressor's; "
                f"resume with the checkpoint's recipe:\n{saved}\nor start a new run. "
                f"This Compressor's recipe:\n{current}"
            )

    # ----------------------------------------------------------------- helpers
    def _event(self, trainer: pl.Trainer, event_type: EventType, **kwargs: Any) -> None:
        self.session.event(
            event_type,
            global_step=trainer.global_step,
            global_batch=self._global_batch,
            **kwargs,
        )

    def _remove_optimizer_hooks(self) -> None:
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []

    def _summary(self) -> str:
        state = self.session.state
        names = [type(mod).__name__ for mod in self.session.lifecycle.recipe.modifiers]
        unit = "epochs" if state.steps_per_epoch else "steps"
        return (
            f"{len(names)} modifier(s) {names}; schedules in {unit} "
            f"({state.steps_per_epoch} optimizer steps per epoch, "
            f"{state.batches_per_step} batch(es) per step)"
        )

    @staticmethod
    def _sparsity_line(model: nn.Module) -> str:
        return f"overall weight sparsity {model_sparsity(model)['__all__']:.1%}"


def _check_trainable(recipe: Recipe) -> None:
    modifiers = recipe.modifiers
    if modifiers and all(mod.is_one_shot for mod in modifiers):
        names = [type(mod).__name__ for mod in modifiers]
        raise RecipeError(
            f"Compressor got a recipe whose modifiers {names} are all one-shot (start: -1); "
            f"set 'start' (e.g. start: 0) to run them during training, or use oneshot() "
            f"for post-training compression"
        )


def _steps_per_epoch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return None
    if not pl_module.automatic_optimization:
        return int(batches) * len(trainer.optimizers)
    return math.ceil(batches / trainer.accumulate_grad_batches)
