"""``CalibrationModule``: one-shot compression run by ``Trainer.validate``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_compress.core import CompressionSession, LoggerManager
from lightning_compress.core.compression_record import RECORD_ATTRIBUTE, partial_compression
from lightning_compress.core.distributed import rank_and_world_size
from lightning_compress.lightning.loggers import TrainerLogger
from lightning_compress.pipelines import (
    BlockReport,
    CalibrationPipeline,
    PipelineOptions,
    WeightResidency,
    check_pipeline_name,
    create_pipeline,
)
from lightning_compress.pipelines.calibration_data import check_token_batch
from lightning_compress.pipelines.coverage import (
    coverage_checked,
    ignore_patterns,
    targeted_layers,
)
from lightning_compress.recipe import Recipe, RecipeArgsInput, RecipeInput, RecipeStageInput
from lightning_compress.summary import CompressionSummary

__all__ = ["CalibrationModule"]


class CalibrationModule(pl.LightningModule):
    """Calibrates and compresses ``model`` when a Trainer validates this module.

    ``Trainer(inference_mode=False).validate(CalibrationModule(model, recipe), dataloaders=...)``
    maps Lightning's hooks onto the session's calibration events: ``on_validation_start``
    initializes the session and emits CALIBRATION_EPOCH_START, each ``validation_step`` hands
    a batch to the pipeline (the sequential pipeline only runs the embeddings and caches the
    first block's inputs), ``on_validation_epoch_end`` walks the blocks (SEQUENTIAL_EPOCH_END
    for each, a rank-zero progress bar, per-block seconds to the session's loggers) and
    ``on_validation_end`` emits CALIBRATION_EPOCH_END and finalizes the session.

    When it ends, the run's coverage of the decoder blocks' weights (compressed, ignored,
    left out; see ``lightning_compress.pipelines.coverage``) is put in ``summary``, its
    numbers go to the Trainer's loggers (``compression/coverage/...``) and weights the
    recipe left out, unnamed by any ``ignore``, are listed in a WARNING. With ``strict``,
    such a recipe (or an ``ignore`` pattern that matches nothing) is refused before the
    model changes.

    The model is deliberately not a registered submodule: Lightning does not move it, the
    pipeline places it (one block at a time on ``device``, the rest where it is). Under DDP
    every rank calibrates its shard of the data and the modifiers reduce their statistics
    across ranks before compressing (``lightning_compress.core.distributed``), so all
    ranks end with the same weights. Under a spawning strategy (``ddp_spawn``) the workers
    compress their own copies (tensors the spawn put in shared memory are copied first);
    the calling process's model is not changed.

    If anything fails (the data, a collate function, the model, a modifier, another
    callback, Ctrl-C), every calibration hook (the modifiers' and the pipeline's) and every
    temporary buffer is removed and the model's modes and placement are restored: inside
    this module's hooks directly, anywhere else in the run through a callback that
    ``configure_callbacks`` hands the Trainer (``on_exception``). The block whose calibration
    failed is restored as it was; blocks finished before keep their full compression state
    and the model carries a record of them (``model.partial_compression``, see
    ``CalibrationPipeline``): the exception says which blocks are compressed,
    ``save_compressed`` refuses such a model and so does a new ``CalibrationModule``. Keeping
    a copy of the original weights to undo the finished blocks would double the model's
    memory. After Ctrl-C, ``Trainer.validate`` itself ends in ``SystemExit(1)`` (Lightning's
    shutdown); ``oneshot`` turns that back into ``KeyboardInterrupt``.

    Args:
        model: the model to compress.
        recipe: the recipe (path, YAML text, dict, modifiers), or an initialized session.
        session: a session to use (initialized here with ``recipe`` if it is not yet).
        recipe_stage: the stage or stages to run.
        recipe_args: values for the recipe's ``${args.name}`` interpolations.
        pipeline: ``auto``, ``sequential``, ``basic`` or ``data_free``.
        sequential_targets: class names of the blocks for the sequential pipeline.
        device: where blocks run; None: the Trainer's root device.
        offload_dir: spill the activation cache to this directory.
        propagate_compressed: feed each block the compressed previous block's outputs (see
            ``PipelineOptions``).
        staged: calibrate blocks in one forward that compresses each group of layers
            when every batch reaches it (see ``PipelineOptions``).
        moe_calibrate_all_experts: during calibration every expert of a mixture-of-experts
            block sees every token (outputs still follow the router); False: only the
            tokens routed to it (see ``PipelineOptions``).
        progress: show a progress bar over the blocks (on rank zero, on stderr when it is a
            terminal); None: where the Trainer shows its own progress bar.
        strict: refuse, before the model changes, a recipe that leaves a weight of the decoder
            blocks out or has an ``ignore`` pattern that matches nothing (checked when this
            module initializes the session, against the recipe given here).
        summary: the ``CompressionSummary`` to fill in at the end (its owner logs it); None:
            one is made and its coverage line logged at INFO.
        residency: reads each block's weights before the sequential pipeline calibrates it
            and writes and frees it after (a model built empty from its checkpoint, see
            ``lightning_compress.lightning.out_of_core``); None: the weights are in memory.

    Raises:
        TypeError: if ``model`` is not a module.
        ValueError: for an unknown pipeline, both ``recipe`` as a session and ``session``, or
            a model that an earlier failed calibration left partly compressed.
        RecipeError: for an invalid recipe; with ``strict``, when it starts, for a recipe that
            leaves weights out.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: RecipeInput | CompressionSession | None = None,
        session: CompressionSession | None = None,
        recipe_stage: RecipeStageInput | None = None,
        recipe_args: RecipeArgsInput | None = None,
        pipeline: str = "auto",
        sequential_targets: list[str] | None = None,
        device: torch.device | str | None = None,
        offload_dir: str | Path | None = None,
        propagate_compressed: bool = True,
        staged: bool = True,
        moe_calibrate_all_experts: bool = True,
        progress: bool | None = None,
        strict: bool = False,
        summary: CompressionSummary | None = None,
        residency: WeightResidency | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        _refuse_partly_compressed(model)
        check_pipeline_name(pipeline)
        if isinstance(recipe, CompressionSession):
            if session is not None:
                raise ValueError("pass the session as recipe or as session, not both")
            recipe, session = None, recipe
        # Kept out of ``_modules`` so that Lightning never moves the whole model.
        self.__dict__["_calibrated_model"] = model
        self.session = session or CompressionSession()
        # Parsed now, so that a bad recipe fails before any Trainer starts.
        self.recipe = (
            Recipe.create_instance(recipe, target_stage=recipe_stage, recipe_args=recipe_args)
            if recipe is not None
            else None
        )
        self.pipeline_name = pipeline
        self.options = PipelineOptions(
            device=device,
            sequential_targets=sequential_targets,
            offload_dir=offload_dir,
            propagate_compressed=propagate_compressed,
            staged=staged,
            moe_calibrate_all_experts=moe_calibrate_all_experts,
            residency=residency,
        )
        self.progress = progress
        self.strict = strict
        self.summary = CompressionSummary() if summary is None else summary
        self._logs_coverage = summary is None
        self._targeted: dict[str, str] = {}
        self.block_reports: list[BlockReport] = []
        self._pipeline: CalibrationPipeline | None = None

    @property
    def model(self) -> nn.Module:
        """The model being compressed."""
        return self.__dict__["_calibrated_model"]

    @property
    def needs_calibration_data(self) -> bool:
        """Whether any modifier of the recipe reads calibration activations."""
        recipe = self.recipe if self.recipe is not None else self.session.lifecycle.recipe
        return recipe is not None and any(m.needs_calibration_data for m in recipe.modifiers)

    def calibrate(self, batches: Iterable[Any] = ()) -> nn.Module:
        """Run the whole calibration in this process, without a Trainer.

        Args:
            batches: the calibration batches; none for data-free recipes.

        Returns:
            The compressed model.
        """
        batches = list(batches)
        with self._aborting_on_error():
            progress = self.progress is not False
            pipeline = self._prepare(bool(batches), self.options.device, progress=progress)
            pipeline(batches)
            self.session.finalize()
        self._report_coverage(rank_and_world_size()[0] == 0)
        return self.model

    def abort(self, error: BaseException | None = None) -> None:
        """Undo an unfinished calibration: hooks and temporary buffers removed, the model's
        modes and placement restored, a partly compressed model marked (see the class
        docstring). Does nothing once the calibration has finished or was aborted.

        Args:
            error: the exception that stopped the calibration.
        """
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.abort(error)
        elif self.session.lifecycle.initialized_:
            self.session.lifecycle.abort()

    # ------------------------------------------------------------ Lightning
    @override
    def configure_callbacks(self) -> list[pl.Callback]:
        return [_AbortOnException()]

    @override
    def on_validation_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "CalibrationModule needs Trainer(inference_mode=False): under "
                "torch.inference_mode the calibration statistics become inference tensors "
                "that cannot update the model's weights"
            )
        trainer = self.trainer
        progress = self.progress
        if progress is None:
            progress = trainer.progress_bar_callback is not None
        if trainer.world_size > 1:
            _unshare(self.model)
        with self._aborting_on_error():
            self._pipeline = self._prepare(
                has_data=True,
                device=self.options.device or trainer.strategy.root_device,
                progress=trainer.is_global_zero and progress,
                trainer=trainer,
            )
            self._pipeline.start()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with self._aborting_on_error():
            check_token_batch(self.model, batch, batch_idx)
            self._pipeline.add_batch(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        with self._aborting_on_error():
            self._pipeline.run()

    @override
    def on_validation_end(self) -> None:
        with self._aborting_on_error():
            self._pipeline.end()
            self._pipeline = None
            self.session.finalize()
        self._report_coverage(self.trainer.is_global_zero)

    # --------------------------------------------------------------- steps
    def _prepare(
        self,
        has_data: bool,
        device: torch.device | str | None,
        progress: bool,
        trainer: pl.Trainer | None = None,
    ) -> CalibrationPipeline:
        """Initialize the session (unless it is) and build the pipeline."""
        if not self.session.lifecycle.initialized_:
            loggers = LoggerManager([TrainerLogger(trainer)]) if trainer is not None else None
            modifiers = self.recipe.modifiers if self.recipe is not None else []
            targets = self.options.sequential_targets
            with coverage_checked(self.model, modifiers, self.strict, targets):
                self.session.initialize(
                    recipe=self.recipe, model=self.model, loggers=loggers, copy_data=False
                )
            self._targeted = targeted_layers(self.model, self.session.lifecycle.recipe.modifiers)
        _record_hardware(self.session, trainer, device)
        self.options.device = device
        self.options.progress = progress
        self.options.on_block_end = self._on_block_end
        self.block_reports = []
        return create_pipeline(self.pipeline_name, self.model, self.session, self.options, has_data)

    def _report_coverage(self, is_global_zero: bool) -> None:
        """Fills ``summary`` in and reports the coverage (on rank zero)."""
        recipe = self.session.lifecycle.recipe
        ignore = ignore_patterns(recipe.modifiers if recipe is not None else [])
        residency = self.options.residency
        self.summary.describe(
            self.model,
            ignore,
            self._targeted,
            self.options.sequential_targets,
            residency.written_labels if residency is not None else None,
        )
        if is_global_zero:
            self.summary.report_coverage(self.session.state.loggers, self._logs_coverage)

    def _on_block_end(self, report: BlockReport) -> None:
        self.block_reports.append(report)
        loggers = self.session.state.loggers
        if loggers is not None:
            loggers.log_scalar(f"calibration/seconds/{report.name}", report.seconds, report.index)

    @contextmanager
    def _aborting_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            self.abort(error)
            raise


class _AbortOnException(pl.Callback):
    """Aborts the calibration when the run fails outside the module's own hooks: in the data,
    the collate function, Lightning itself or another callback."""

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(pl_module, CalibrationModule):
            pl_module.abort(exception)


def _refuse_partly_compressed(model: nn.Module) -> None:
    record = partial_compression(model)
    if record is not None:
        raise ValueError(
            f"model: an earlier calibration failed and left it partly compressed "
            f"({record.describe()}); compressing it again would compress its finished blocks "
            f"twice: reload the original model (or delete model.{RECORD_ATTRIBUTE} to go on "
            f"at your own risk)"
        )


def _unshare(model: nn.Module) -> None:
    """Give this process its own copy of tensors in shared memory.

    ``ddp_spawn`` on CPU hands every worker the parent's tensors in shared memory; ranks
    compressing in place would then write into one another's model.
    """
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is not None and tensor.is_shared():
                        tensor.data = tensor.data.clone()


def _record_hardware(
    session: CompressionSession, trainer: pl.Trainer | None, device: torch.device | str | None
) -> None:
    hardware = session.state.hardware
    hardware.device = str(device) if device is not None else None
    if trainer is None:
        return
    hardware.rank = trainer.global_rank
    hardware.local_rank = trainer.local_rank
    hardware.world_size = trainer.world_size
    hardware.distributed = trainer.world_size > 1
    hardware.distributed_strategy = type(trainer.strategy).__name__
