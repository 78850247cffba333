"""``Compressor``: a Lightning callback that runs a compression recipe while a model trains."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from loguru import logger
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_compress.core import (
    CompressionSession,
    Event,
    EventType,
    LoggerManager,
    model_sparsity,
)
from lightning_compress.lightning.calibration import _unshare
from lightning_compress.lightning.gathered import full_model
from lightning_compress.lightning.kept_zeros import keep_pruned_zeros
from lightning_compress.lightning.loggers import TrainerLogger
from lightning_compress.lightning.memory_plan import report_memory_plan
from lightning_compress.lightning.training_calibration import (
    calibrated_model,
    calibration_batches,
    carried_layers,
    check_one_shot_strategy,
    freeze_carried_qparams,
    rewrap_ddp,
    run_one_shot,
    shards_at_configure_model,
    split_recipe,
    start_from_one_shot,
    take_one_shot_qparams,
)
from lightning_compress.modifiers.distillation.teacher import (
    check_teacher,
    check_teacher_vocabulary,
    make_teacher,
    place_teacher,
)
from lightning_compress.modifiers.pruning.constant import MASK_BUFFER
from lightning_compress.modifiers.quantization.qat import OBSERVER_BUFFERS
from lightning_compress.modifiers.quantization.runtime import QPARAM_BUFFERS
from lightning_compress.pipelines.coverage import (
    coverage_checked,
    ignore_patterns,
    targeted_layers,
)
from lightning_compress.recipe import (
    Recipe,
    RecipeArgsInput,
    RecipeError,
    RecipeStageInput,
)
from lightning_compress.summary import CompressionSummary

__all__ = ["Compressor", "check_compressor_resume", "compression_loss"]

# Names of the state that modifiers add to a model: buffers, and the parametrized weight.
_COMPRESSION_NAMES = frozenset((MASK_BUFFER, *QPARAM_BUFFERS, *OBSERVER_BUFFERS))
_PARAMETRIZED = ".parametrizations."


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


def check_compressor_resume(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Refuse to resume a compressing run's checkpoint in a Trainer without a ``Compressor``.

    Call it from a LightningModule's ``on_load_checkpoint`` (``CausalLMModule`` does):
    Lightning calls that before it loads the model's state, which holds masks and qparams
    that only a Compressor with the checkpoint's recipe sets up.

    Args:
        trainer: the Trainer restoring ``checkpoint``.
        checkpoint: the loaded checkpoint.

    Raises:
        RecipeError: when fitting from a checkpoint saved while a Compressor was compressing
            (not after it finished) and ``trainer`` has no Compressor; the message holds the
            checkpoint's recipe.
    """
    if trainer.state.fn != "fit" or any(isinstance(cb, Compressor) for cb in trainer.callbacks):
        return
    states = checkpoint.get("callbacks") or {}
    recipes = [  # a checkpoint saved once compression finished holds a plain model
        state.get("recipe")
        for key, state in states.items()
        if str(key).startswith(Compressor.__qualname__)
        and isinstance(state, dict)
        and not state.get("finalized")
    ]
    if recipes:
        raise RecipeError(
            "the checkpoint was saved by a run compressing the model with a Compressor, and "
            "this Trainer has none: resume with Compressor(<the same recipe>) in its "
            f"callbacks. The checkpoint's recipe:\n{recipes[0]}"
        )


class Compressor(Callback):
    """Compress any LightningModule while it trains, following a recipe.

    The callback owns a ``CompressionSession`` and turns Lightning hooks into lifecycle events:
    ``setup`` builds the recipe and lets modifiers create their buffers (before a checkpoint
    is restored), ``on_train_start`` hands over the optimizer and the epoch geometry, each
    batch emits BATCH_START, LOSS_CALCULATED, OPTIM_PRE_STEP, OPTIM_POST_STEP (from an
    optimizer step post-hook, so a step skipped by AMP's GradScaler emits nothing) and
    BATCH_END, and ``on_train_end`` finalizes and reports the coverage of the decoder blocks'
    weights (compressed, ignored, left out: ``summary``, a line at INFO, its numbers to the
    Trainer's loggers under ``compression/coverage/``, and a WARNING listing weights the recipe
    left out that no ``ignore`` names).

    Resuming (``trainer.fit(..., ckpt_path=...)``) continues exactly like an uninterrupted
    run, up to float rounding of the hardware, when:

    - the Compressor gets a recipe with the same modifiers and settings, in the same order
      (stage and group names, and YAML versus Python objects, do not matter); another recipe
      is refused with a ``RecipeError`` before training, naming the compression state that
      differs, and so is a resume with a Compressor without the checkpoint's recipe; a
      resume without any Compressor is refused by ``check_compressor_resume`` in the
      LightningModule's ``on_load_checkpoint`` (``CausalLMModule`` calls it; elsewhere
      Lightning's strict ``load_state_dict`` names the compression buffers it did not expect);
    - the checkpoint was saved at an epoch boundary, or the training DataLoader is
      resumable (it implements ``state_dict`` / ``load_state_dict``, like torchdata's
      ``StatefulDataLoader``): otherwise a mid-epoch resume restarts the data at batch 0
      and trains on other batches, which is logged as a warning;
    - the epoch geometry is the same (batches per epoch, ``accumulate_grad_batches``,
      number of devices): schedules in epochs map to other steps otherwise (warned);
    - the training itself is deterministic (same data order, seeds, devices and kernels).

    A recipe may start with one-shot modifiers (``start: -1``: GPTQ, AWQ, SparseGPT,
    round-to-nearest) before its training ones. The one-shot part runs once, at the start of
    training (before the first optimizer step), on every rank, with the calibration pipeline
    ``oneshot`` uses, on ``calibration_data`` or else the first ``num_calibration_batches``
    batches of each rank's training DataLoader (under DDP each rank calibrates on its shard
    and the statistics are reduced across ranks, so every rank gets the same model). Under
    ``ModelParallelStrategy`` (FSDP2) it runs at ``setup`` instead, on the whole model before
    ``configure_model`` shards it (a model whose weights are on the meta device is refused),
    on ``calibration_data`` or else the first batches of the DataLoader the datamodule or
    LightningModule gives (Lightning has not sharded it yet: with its distributed sampler
    every rank reads the same batches; a DataLoader that shards itself by rank gives each
    rank its own, reduced as under DDP). A
    training ``QuantizationModifier`` must quantize the layers the one-shot part quantized,
    with the same grid (refused at ``setup``, before the model changes, naming the fields
    that differ); it starts from the one-shot weights and weight qparams, which stay fixed, so
    training learns within the one-shot grid (see
    ``lightning_compress.lightning.training_calibration``). A resumed run does not run the
    one-shot part again: its result is in the checkpoint.

    Everything compression needs at the next step is restored before any modifier acts:
    masks, qparams, observer statistics and layers already baked by quantization-aware
    training come from the model's state; before the first batch, every modifier is started
    (and ended) as an uninterrupted run has it at that step; each schedule decision is made
    from the step index alone.

    Args:
        recipe: the recipe (path, YAML/JSON text, dict, modifiers: any ``RecipeInput``; typed
            ``Any`` so LightningCLI passes YAML mappings through unchanged); None runs no
            modifier (useful to measure the callback's own overhead).
        recipe_stage: the stage or stages to run; None runs all.
        recipe_args: values for the recipe's ``${args.name}`` interpolations.
        teacher: the teacher of distillation modifiers: a model with the student's output
            shape, or ``"uncompressed"``: a frozen copy of the LightningModule made at
            ``setup``, before any modifier (the one-shot stage included) changes it. The
            teacher is frozen (``requires_grad`` False, eval mode), held by the callback only
            (in neither the LightningModule's parameters nor its ``state_dict`` nor
            checkpoints), and moved at the start of training to ``teacher_device`` or the
            student's device. A resumed run copies the model as built before the checkpoint
            loads, so build it the same way (e.g. ``from_pretrained``).
        teacher_dtype: the teacher's floating-point dtype (e.g. ``"bfloat16"``; the copy is
            made in it, never as a second fp32 copy); None keeps the student's.
        teacher_device: the teacher's device (e.g. ``"cuda:1"``); None: the student's.
        model_log_cadence: how often (in epochs, or steps when the epoch length is unknown)
            per-layer sparsity is logged to the Trainer's loggers.
        save_dir: when training ends (after finalize, on rank 0), save the model the
            LightningModule holds (a transformers model or the bundled TinyDecoder) here as a
            compressed-tensors checkpoint (under FSDP2 every rank helps gather the full
            weights onto rank 0's CPU, and rank 0 saves them: the checkpoint is the one a
            single process saves) with the recipe and the tokenizer
            (``save_compressed``; needs the ``hf`` extra). It must not exist or be empty
            (unless ``overwrite``); that is checked at ``setup``.
        tokenizer: the tokenizer saved into ``save_dir`` (a transformers tokenizer or the
            bundled ``ByteTokenizer``); when None, the ``tokenizer`` attribute of the
            LightningModule or else of the datamodule (``CausalLMModule`` has one). Without
            any, the checkpoint has no tokenizer files, which is logged as a warning at
            ``setup``.
        overwrite: replace ``save_dir`` when it exists and is not empty.
        strict: refuse at ``setup``, before the model changes, a recipe that leaves a weight
            of the decoder blocks out (neither targeted nor ignored) or has an ``ignore``
            pattern that matches nothing.
        calibration_data: batches for the recipe's one-shot part (every rank reads all of
            them); None: the training DataLoader's first ``num_calibration_batches``.
        num_calibration_batches: how many batches the one-shot part calibrates on (per rank).
        pipeline: the calibration pipeline of the one-shot part (``sequential``, ``basic``,
            ``auto``; one that reads no data runs ``data_free``).
        keep_pruned_zeros: keep the zeros of the layers the one-shot part prunes
            (SparseGPT, Wanda, one-shot magnitude pruning) through training when no training
            stage masks them: a ``ConstantPruningModifier`` on those layers runs first in the
            training part (logged at INFO, naming them; the saved recipe is the one given).
            False lets training grow them back, with a warning naming them.

    Raises:
        ValueError: for ``num_calibration_batches`` below 1; at ``setup``, before any
            modifier changes the model, for a teacher whose output layer (vocabulary) differs
            from the student's, naming both logit shapes.
        TypeError: at ``setup``, for a tokenizer that cannot be saved.
        RecipeError: at ``setup``, for an invalid recipe, or (``strict``) one that leaves
            weights out, or a one-shot part the strategy cannot run (see above).
    """

    def __init__(
        self,
        recipe: Any = None,
        recipe_stage: RecipeStageInput | None = None,
        recipe_args: RecipeArgsInput | None = None,
        teacher: nn.Module | str | None = None,
        teacher_dtype: str | None = None,
        teacher_device: str | None = None,
        model_log_cadence: float | None = None,
        save_dir: str | os.PathLike | None = None,
        tokenizer: Any | None = None,
        overwrite: bool = False,
        strict: bool = False,
        calibration_data: Iterable[Any] | None = None,
        num_calibration_batches: int = 32,
        pipeline: str = "sequential",
        keep_pruned_zeros: bool = True,
    ) -> None:
        if num_calibration_batches < 1:
            raise ValueError(
                f"num_calibration_batches: expected an integer >= 1, got {num_calibration_batches}"
            )
        self.recipe = recipe
        self.recipe_stage = recipe_stage
        self.recipe_args = recipe_args
        check_teacher(teacher, teacher_dtype)
        self.teacher = teacher
        self.teacher_dtype = teacher_dtype
        self.teacher_device = teacher_device
        self.teacher_model: nn.Module | None = None  # built at setup
        self.model_log_cadence = model_log_cadence
        self.save_dir = save_dir
        self.tokenizer = tokenizer
        self.overwrite = overwrite
        self.strict = strict
        self.calibration_data = calibration_data
        self.num_calibration_batches = num_calibration_batches
        self.pipeline = pipeline
        self.keep_pruned_zeros = keep_pruned_zeros
        self.session = CompressionSession()
        self.summary = CompressionSummary()
        self._targeted: dict[str, str] = {}
        self._save_tokenizer: Any | None = None
        self._optimizer_hooks: list[Any] = []
        self._global_batch = 0
        self._last_post_step: tuple[int, int] | None = None
        self._load_check: RemovableHandle | None = None
        self._saved_geometry: tuple[int | None, int | None] | None = None
        self._full_recipe: Recipe | None = None
        self._one_shot: Recipe | None = None  # the recipe's one-shot part, if it has one
        self._one_shot_done = False
        self._training_recipe: Recipe | None = None
        self._carried: dict[str, Any] = {}
        self._resume_setup: RemovableHandle | None = None

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.session.lifecycle.initialized_:
            return
        # Before any modifier (the one-shot stage included) changes the model.
        self.teacher_model = make_teacher(
            self.teacher, pl_module, self.teacher_dtype, self.teacher_device
        )
        check_teacher_vocabulary(self.teacher_model, pl_module)
        report_memory_plan(trainer, pl_module, self.teacher_model, self.teacher_device)
        if self.save_dir is not None:  # on every rank, so that all of them stop alike
            from lightning_compress.export import check_output_dir  # the optional hf extra

            check_output_dir(self.save_dir, overwrite=self.overwrite)
            self._save_tokenizer = self._find_tokenizer(trainer, pl_module)
        recipe = (
            Recipe()
            if self.recipe is None
            else Recipe.create_instance(
                self.recipe, target_stage=self.recipe_stage, recipe_args=self.recipe_args
            )
        )
        _check_trainable(recipe)
        if trainer.world_size > 1:  # ddp_spawn: the ranks would update one shared model
            _unshare(pl_module)
        self._full_recipe = recipe
        one_shot, self._training_recipe = split_recipe(recipe)
        if trainer.ckpt_path is None:  # a resumed run's checkpoint holds the one-shot result
            check_one_shot_strategy(trainer.strategy, one_shot, pl_module)
        if one_shot.modifiers:
            with coverage_checked(pl_module, recipe.modifiers, self.strict):
                self._carried = carried_layers(one_shot, self._training_recipe, pl_module)
            self._training_recipe = keep_pruned_zeros(
                one_shot, self._training_recipe, pl_module, self.keep_pruned_zeros
            )
            self._one_shot = one_shot
            if shards_at_configure_model(trainer.strategy):
                # The model is whole now, before configure_model shards it.
                self._one_shot_before_sharding(trainer, pl_module)
            else:
                # Fresh runs set training up after the one-shot part (on_train_start); a
                # resumed run's checkpoint holds its result: training is set up before it loads.
                self._resume_setup = pl_module.register_load_state_dict_pre_hook(
                    lambda *_: self._initialize_training(trainer, pl_module)
                )
        else:
            self._initialize_training(trainer, pl_module)
        self._load_check = pl_module.register_load_state_dict_post_hook(self._check_loaded_keys)

    def _initialize_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialize the session with the recipe's training part (once)."""
        if self.session.lifecycle.initialized_:
            return
        self._remove_resume_setup()
        modifiers = self._training_recipe.modifiers
        # A recipe with a one-shot part was checked whole at setup.
        with coverage_checked(pl_module, modifiers, self.strict and self._one_shot is None):
            self.session.initialize(
                recipe=self._training_recipe,
                model=pl_module,
                teacher_model=self.teacher_model,
                loggers=LoggerManager([TrainerLogger(trainer)], log_python=False),
                model_log_cadence=self.model_log_cadence,
                copy_data=False,
            )
        self._targeted = targeted_layers(pl_module, self._full_recipe.modifiers)

    def _one_shot_before_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under a strategy that shards the model in ``configure_model`` (FSDP2): run the
        one-shot part now, on the whole model, and set training up (a resumed run only sets
        training up: its checkpoint holds the one-shot result)."""
        if trainer.ckpt_path is None:
            self._run_one_shot_stage(trainer, pl_module)
        else:
            self._initialize_training(trainer, pl_module)

    def _run_one_shot_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the recipe's one-shot part, then set training up from its result."""
        one_shot = self._one_shot
        needs_data = any(modifier.needs_calibration_data for modifier in one_shot.modifiers)
        batches = (
            calibration_batches(trainer, self.calibration_data, self.num_calibration_batches)
            if needs_data
            else []
        )
        rank_zero_info(
            f"Compressor: one-shot stage {[type(mod).__name__ for mod in one_shot.modifiers]} "
            f"on {len(batches)} batch(es) per rank"
        )
        run_one_shot(
            one_shot,
            calibrated_model(pl_module),
            batches,
            self.pipeline,
            trainer.strategy.root_device,
            trainer.is_global_zero and trainer.progress_bar_callback is not None,
        )
        qparams = take_one_shot_qparams(pl_module, self._carried)
        self._initialize_training(trainer, pl_module)
        start_from_one_shot(pl_module, qparams)
        rewrap_ddp(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_check()
        if self._one_shot is not None and not self.session.lifecycle.initialized_:
            self._run_one_shot_stage(trainer, pl_module)
        self._one_shot_done = True  # by this run, or by the run that saved the checkpoint
        freeze_carried_qparams(pl_module, self._carried)
        optimizers = trainer.optimizers
        if self.teacher_model is not None:
            place_teacher(self.teacher_model, self.teacher_device or pl_module.device)
        steps_per_epoch = _steps_per_epoch(trainer, pl_module)
        if trainer.ckpt_path is not None:
            self._warn_if_resume_is_not_exact(trainer, steps_per_epoch)
        self.session.initialize(
            optimizer=optimizers[0] if len(optimizers) == 1 else optimizers,
            steps_per_epoch=steps_per_epoch,
            batches_per_step=trainer.accumulate_grad_batches,
            start=trainer.current_epoch,
        )
        if trainer.ckpt_path is not None and trainer.global_step > 0:
            self._catch_up(trainer)
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
            # Counting sharded (FSDP2) weights is a collective: every rank counts, rank 0 logs.
            sparsity = self._sparsity_line(pl_module)
            rank_zero_info(f"Compressor finished: {sparsity}")
            ignore = ignore_patterns(self.session.lifecycle.recipe.modifiers)
            self.summary.describe(pl_module, ignore, self._targeted)
            if trainer.is_global_zero:
                self.summary.report_coverage(self.session.state.loggers)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir is None or not self.session.lifecycle.finalized:
            return
        from lightning_compress.export import save_compressed  # the optional hf extra

        # Under FSDP2 every rank takes part in gathering the full weights; rank 0 saves them.
        with full_model(pl_module, keep=trainer.is_global_zero):
            if trainer.is_global_zero:
                save_compressed(
                    pl_module,
                    self.save_dir,
                    tokenizer=self._save_tokenizer,
                    recipe=self._serialized_recipe(),
                    overwrite=self.overwrite,
                )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_check()  # a fit that ends before training starts never reaches it

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_optimizer_hooks()
        self._remove_load_check()
        try:
            self.session.lifecycle.abort()
        except Exception as err:  # Lightning re-raises ``exception`` itself afterwards
            logger.error("Compressor: cleaning up after {!r} failed: {!r}", exception, err)

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
            "recipe": self._serialized_recipe() if lifecycle.initialized_ else None,
            "global_step": lifecycle.global_step,
            "global_batch": lifecycle.global_batch,
            "steps_per_epoch": self.session.state.steps_per_epoch,
            "batches_per_step": self.session.state.batches_per_step,
            "finalized": lifecycle.finalized,
            "one_shot_done": self._one_shot is None or self._one_shot_done,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_geometry = (
            state_dict.get("steps_per_epoch"),
            state_dict.get("batches_per_step"),
        )
        saved = state_dict.get("recipe")
        if saved is None or not self.session.lifecycle.initialized_:
            return
        if not state_dict.get("one_shot_done", True):
            raise RecipeError(
                "the checkpoint was saved before its recipe's one-shot stage ran; start a new run"
            )
        current = self._full_recipe
        try:
            same = Recipe.create_instance(saved).same_modifiers(current)
        except RecipeError as err:
            raise RecipeError(
                f"the checkpoint's recipe cannot be built ({err}); resume with a version of "
                f"lightning-compress that has its modifiers, or start a new run"
            ) from err
        if not same:
            raise RecipeError(
                "the checkpoint was trained with a different recipe than this Compressor's; "
                f"resume with the checkpoint's recipe:\n{saved}\nor start a new run. "
                f"This Compressor's recipe:\n{current.yaml()}"
            )

    # ----------------------------------------------------------------- helpers
    def _find_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any | None:
        """The tokenizer to save: ``self.tokenizer``, else the module's or the datamodule's.

        Raises:
            TypeError: naming where the tokenizer came from when it cannot be saved.
        """
        from lightning_compress.export import check_tokenizer  # the optional hf extra

        sources = {
            "Compressor.tokenizer": self.tokenizer,
            f"{type(pl_module).__name__}.tokenizer": getattr(pl_module, "tokenizer", None),
            "the datamodule's tokenizer": getattr(trainer.datamodule, "tokenizer", None),
        }
        for where, tokenizer in sources.items():
            if tokenizer is not None:
                check_tokenizer(tokenizer, where)
                return tokenizer
        if trainer.is_global_zero:
            logger.warning(
                "Compressor(save_dir={!r}) found no tokenizer (neither Compressor(tokenizer=...) "
                "nor a 'tokenizer' attribute of the LightningModule or the datamodule): the "
                "checkpoint will have no tokenizer files, so AutoTokenizer cannot load it",
                str(self.save_dir),
            )
        return None

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

    def _catch_up(self, trainer: pl.Trainer) -> None:
        """Start (and end) the modifiers an uninterrupted run has started (and ended) by now."""
        state = self.session.state
        first = Event(
            type_=EventType.BATCH_START,
            steps_per_epoch=state.steps_per_epoch,
            batches_per_step=state.batches_per_step,
            global_step=trainer.global_step,
            global_batch=trainer.fit_loop.epoch_loop.batch_progress.total.completed,
        )
        for modifier in self.session.lifecycle.recipe.modifiers:
            modifier.catch_up(state, first)

    def _remove_load_check(self) -> None:
        self._remove_resume_setup()
        if self._load_check is not None:
            self._load_check.remove()
            self._load_check = None

    def _remove_resume_setup(self) -> None:
        if self._resume_setup is not None:
            self._resume_setup.remove()
            self._resume_setup = None

    def _serialized_recipe(self) -> str | None:
        """The whole recipe (one-shot and training parts) as YAML."""
        if self._full_recipe is None:
            return self.session.get_serialized_recipe()
        return self._full_recipe.yaml()

    def _check_loaded_keys(self, module: nn.Module, incompatible: Any) -> None:
        """Post-hook of the LightningModule's ``load_state_dict`` while a checkpoint restores.

        Raises:
            RecipeError: under strict loading, when compression state (masks, qparams,
                observer statistics, parametrized weights) of the checkpoint and of the model
                this Compressor's recipe set up differ; it names the keys.
        """
        if not getattr(module, "strict_loading", True):
            return
        missing, unexpected = list(incompatible.missing_keys), list(incompatible.unexpected_keys)
        if not any(map(_is_compression_key, missing + unexpected)):
            return
        raise RecipeError(
            "the checkpoint's compression state does not match this Compressor's recipe: "
            f"the checkpoint lacks {_some(missing)} and holds {_some(unexpected)} that the "
            "recipe does not create. Either it was trained with another recipe (resume with "
            "that one: the checkpoint's callback state 'recipe' holds it) or it was saved after "
            "compression finished (masks and training state are removed then: start a new run "
            "from its weights). This Compressor's recipe:\n"
            f"{self._serialized_recipe()}"
        )

    def _warn_if_resume_is_not_exact(self, trainer: pl.Trainer, steps: int | None) -> None:
        geometry = (steps, trainer.accumulate_grad_batches)
        if self._saved_geometry is not None and self._saved_geometry != geometry:
            logger.warning(
                "Compressor: resuming with (steps per epoch, batches per step) = {} where the "
                "checkpoint had {}: schedules in epochs move to other steps, so the resumed "
                "run is not exact",
                geometry,
                self._saved_geometry,
            )
        if steps is None or trainer.global_step % steps == 0:
            return
        if all(map(_resumable, _train_loaders(trainer.train_dataloader))):
            return
        logger.warning(
            "Compressor: resuming mid-epoch (step {} of {} per epoch) with a training "
            "DataLoader that has no state_dict/load_state_dict: it restarts at batch 0, so the "
            "compression schedule meets other batches and the resumed run is not exact. Save "
            "checkpoints at epoch boundaries or use a resumable loader (e.g. torchdata's "
            "StatefulDataLoader)",
            trainer.global_step % steps,
            steps,
        )

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
            f"Compressor got a recipe whose modifiers {names} are all one-shot (start: -1) "
            f"and no training stage after them; set 'start' (e.g. start: 0) to run them "
            f"during training, add a training stage (e.g. a QuantizationModifier with "
            f"start: 0 and the same scheme), or use oneshot() for post-training compression"
        )


def _is_compression_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _COMPRESSION_NAMES or _PARAMETRIZED in key


def _some(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "nothing"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{sorted(keys)[:limit]}{more}"


def _train_loaders(loaders: Any) -> list[Any]:
    """The DataLoaders of ``trainer.train_dataloader`` (one, or a list/dict of them)."""
    if isinstance(loaders, dict):
        return [item for value in loaders.values() for item in _train_loaders(value)]
    if isinstance(loaders, (list, tuple)):
        return [item for value in loaders for item in _train_loaders(value)]
    return [loaders]


def _resumable(loader: Any) -> bool:
    """Whether Lightning restores ``loader``'s position from a checkpoint."""
    return hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")


def _steps_per_epoch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return None
    if not pl_module.automatic_optimization:
        return int(batches) * len(trainer.optimizers)
    return math.ceil(batches / trainer.accumulate_grad_batches)
