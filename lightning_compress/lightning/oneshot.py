"""``oneshot()``: post-training compression of a model in one call."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.core.distributed import rank_and_world_size
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.lightning.llmcompressor_keywords import accepts_llmcompressor_keywords
from lightning_compress.lightning.out_of_core import (
    CheckpointResidency,
    OutOfCoreCalibration,
    run_inputs,
    spawns_workers,
    weights_written_to,
)
from lightning_compress.lightning.quiet import quiet_lightning
from lightning_compress.pipelines.calibration_data import calibration_loader, calibration_samples
from lightning_compress.pipelines.checkpoint_source import CheckpointSource
from lightning_compress.recipe import RecipeArgsInput, RecipeInput, RecipeStageInput
from lightning_compress.summary import CompressionSummary

__all__ = ["calibration_loader", "calibration_samples", "oneshot"]


@accepts_llmcompressor_keywords
def oneshot(
    model: nn.Module | str | Path,
    recipe: RecipeInput,
    dataset: Any | None = None,
    num_calibration_samples: int | None = 512,
    max_seq_length: int | None = 2048,
    output_dir: str | Path | None = None,
    pipeline: str | None = "auto",
    sequential_targets: list[str] | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    offload_dir: str | Path | None = None,
    recipe_stage: RecipeStageInput | None = None,
    recipe_args: RecipeArgsInput | list[str] | None = None,
    tokenizer: Any | str | Path | None = None,
    devices: int | str | list[int] | None = None,
    strategy: str | pl.strategies.Strategy | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    propagate_compressed: bool = True,
    staged: bool = True,
    moe_calibrate_all_experts: bool = True,
    trainer: pl.Trainer | None = None,
    overwrite_output_dir: bool = False,
    text_column: str = "text",
    concatenate_data: bool | None = None,
    progress: bool = True,
    summary: CompressionSummary | None = None,
    strict: bool = False,
    out_of_core: bool | str = "auto",
) -> nn.Module:
    """Compress ``model`` after training: calibrate on ``dataset`` and apply ``recipe``.

    The calibration runs as ``Trainer(inference_mode=False).validate(CalibrationModule)``
    (one process by default); without a dataset the recipe runs data-free, without a Trainer.
    The sequential pipeline keeps the model where it is and runs one block at a time on
    ``device``. The model is compressed in place. The run ends with a summary of what was
    compressed, the size before and after and the time per phase (``CompressionSummary``);
    weights of the decoder blocks that the recipe leaves out (neither compressed nor named by
    an ``ignore``) are listed in a WARNING.

    Whatever raises (the data, the model, a modifier, Ctrl-C), the model keeps no calibration
    hook and no temporary buffer, and its modes and placement are restored. The block whose
    compression failed is restored; blocks compressed before the failure keep their full
    compression state, the exception gets a note naming them and the model a record
    (``model.partial_compression``) that ``save_compressed`` and a new ``oneshot`` refuse:
    reload the original model to compress it again (see ``CalibrationModule``).

    Every keyword argument of llm-compressor's ``oneshot`` is taken too (``processor``,
    ``stage``, ``splits``, ``shuffle_calibration_samples``, ``precision``, ``log_dir``, ...):
    each is read with its meaning there, or refused with an error naming it and what to do
    instead (see ``lightning_compress.lightning.llmcompressor_keywords``).

    Args:
        model: the model to compress (e.g. a Hugging Face causal LM), or the directory of a
            transformers checkpoint (or a model name in the Hugging Face cache; nothing is
            downloaded), loaded with ``from_pretrained`` (a compressed-tensors checkpoint
            dequantized), or read one block at a time with ``out_of_core``.
        recipe: the recipe (path, YAML text, dict, modifiers).
        dataset: the calibration data: a LongTensor ``[N, L]`` of token ids, a list of dicts with
            ``input_ids`` (and optionally ``attention_mask``), a torch ``Dataset``, a
            ``DataLoader`` (its batches, tensors, dicts or ``(input_ids, attention_mask)``
            tuples, are split into samples), a Hugging Face ``datasets.Dataset``
            (``input_ids``, text or chat ``messages`` column), the path of a local data file
            (``.txt``, ``.json``, ``.jsonl``, ``.parquet``, ``.arrow``, or a directory written by
            ``datasets.Dataset.save_to_disk``), or text with a tokenizer (a list of strings,
            or one string with spaces or lines, cut into windows); None runs data-free. A
            string that looks like a path (a data-file suffix, or a path separator and no
            spaces) must exist; one word that is no local path is taken for a hub dataset
            name and refused (nothing is downloaded). It is read and checked (integer ids
            within the model's vocabulary and positions, masks of 0 and 1) before
            calibrating.
        num_calibration_samples: samples to take from the start of ``dataset``; None takes all.
        max_seq_length: samples are truncated to this many tokens (text is cut into windows
            of this length); None: the model's ``config.max_position_embeddings``.
        output_dir: save the compressed model here, in the compressed-tensors format that
            transformers and vLLM load (``lightning_compress.export.save_compressed``, with
            the tokenizer and the recipe; needs the ``hf`` extra). Checked before calibrating.
        pipeline: ``auto``, ``sequential``, ``basic`` or ``data_free``. ``auto`` runs
            ``data_free`` (without reading ``dataset``) when no modifier needs calibration
            data (weight-only RTN, dynamic activations), else ``sequential`` where the model
            has repeated blocks, else ``basic``. llm-compressor's ``datafree`` is
            ``data_free``; its ``independent`` and None are ``auto``.
        sequential_targets: class names of the blocks for the sequential pipeline.
        batch_size: samples per calibration batch (padded to the longest).
        device: where blocks run (``"cuda"``); None: the Trainer's device.
        offload_dir: spill the activation cache to this directory instead of CPU memory.
        recipe_stage: the stage or stages of the recipe to run.
        recipe_args: values for the recipe's ``${args.name}`` interpolations (a mapping,
            or ``["name=value", ...]``).
        tokenizer: tokenizes text data; saved with the model; its ``pad_token_id`` pads. A
            path: the tokenizer of that directory. None: where the run reads data or saves,
            the tokenizer of the model's directory (a model given as a path, or its
            ``config._name_or_path`` when that is a directory or in the Hugging Face cache),
            if it has one.
        devices: the Trainer's ``devices`` (several processes split the data).
        strategy: the Trainer's ``strategy``, e.g. ``"ddp"``; spawning strategies
            (``ddp_fork``, ``ddp_spawn``) are refused, except with ``out_of_core`` (the
            workers write the checkpoint).
        trainer_kwargs: more ``Trainer`` arguments (they override the defaults, except
            ``inference_mode``, which calibration needs off).
        propagate_compressed: feed each block the compressed previous block's outputs.
        staged: calibrate blocks in one forward that compresses each group of layers
            when every batch reaches it (see ``PipelineOptions``).
        moe_calibrate_all_experts: during calibration every expert of a mixture-of-experts
            block sees every token (outputs still follow the router); False: only the
            tokens routed to it (see ``PipelineOptions``).
        trainer: run on this Trainer (built with ``inference_mode=False``) instead of one
            built from ``device``, ``devices``, ``strategy`` and ``trainer_kwargs``.
        overwrite_output_dir: replace ``output_dir`` if it exists and is not empty.
        text_column: the column of ``dataset``'s records that holds their text; records
            without the default ``"text"`` but with ``messages`` are chat, rendered by the
            tokenizer's chat template.
        concatenate_data: for data files: True joins the records' tokens into windows of
            ``max_seq_length``; False takes one sample per record (per line of a ``.txt``);
            None windows ``.txt`` files and takes one sample per record of the others.
        progress: show a progress bar over the calibrated blocks and one over the saved
            tensors (on stderr, when it is a terminal). Lightning's own progress bar and its
            informational messages are hidden during the run either way (see
            ``lightning_compress.set_verbosity``).
        summary: a ``CompressionSummary`` to fill in (layers compressed per scheme, ignored
            and left out, size before and after, seconds per phase); the caller then logs
            it, after adding what it measured around the call (loading, quality). None: one
            is made and logged at INFO at the end of the run.
        strict: refuse, before the model changes, a recipe that leaves a weight of the
            decoder blocks out (neither targeted nor ignored) or has an ``ignore`` pattern
            that matches nothing.
        out_of_core: True: compress ``model``, a local checkpoint directory with safetensors
            shards, without loading it: the model is built empty from its config and each
            decoder block is read from the shards, calibrated, compressed, written to
            ``output_dir`` (required) and freed, so memory holds one block, the modules
            outside the blocks while they run and the activation cache (see
            ``lightning_compress.lightning.out_of_core``); the weights keep their stored
            dtype. A run that stopped (killed, disk full) continues after its last written
            block when started again with the same arguments; another recipe, model or data
            is refused, naming what differs. Runs the sequential pipeline; under several
            processes (``devices``/``strategy``) each rank reads every block and calibrates
            it on its share of the data, each layer is solved on one rank, and rank zero
            alone writes ``output_dir``. False: load it. ``"auto"`` (default), for a
            directory: out of core when its weights take more than half the available
            memory and ``output_dir`` is given (``choose_out_of_core`` logs the choice).
            Under several processes every rank chooses the same (from the least memory of
            all where ``torch.distributed`` runs; the ranks Lightning's ``ddp`` starts take
            the first rank's choice); processes started apart (``torchrun``) before they
            are connected cannot compare and warn: pass True or False there.
        **llmcompressor_keywords: llm-compressor's other ``oneshot`` keywords.

    Returns:
        ``model``, compressed; with ``out_of_core``, the empty model (its weights are in
        ``output_dir`` only: running it raises an error saying so).

    Raises:
        TypeError: if ``model`` or ``dataset`` has the wrong type, a record lacks
            ``text_column``, or a keyword is neither ours nor llm-compressor's.
        ValueError: for bad sizes, too little data, token ids or masks the model cannot
            take, a dataset name, a model name that is neither a directory nor cached, an
            llm-compressor keyword or value that is refused (the message says why), an
            unreadable data file, chat records without a chat template, a spawning
            strategy, or ``trainer`` together with Trainer settings; with ``out_of_core``:
            no ``output_dir``, a module instead of a directory, another pipeline than
            ``auto``/``sequential``, shards that do not match the config
            or a model class transformers cannot build (named).
        FileNotFoundError: if ``dataset`` is a path, or looks like one, and does not exist;
            with ``out_of_core``, if the directory lacks ``config.json`` or safetensors.
        ExportError: if ``output_dir`` exists and is not empty (without
            ``overwrite_output_dir``) or cannot be written, or the compressed model cannot be
            exported; with ``out_of_core``, when a resumed run differs from the one that
            started (named), or the disk fills up (the last written block is named).
        RuntimeError: with ``out_of_core``, when the recipe changed blocks after they were
            written.
        ImportError: if ``output_dir`` is set but the ``hf`` extra is not installed.
        KeyboardInterrupt: after Ctrl-C during the calibration (not Lightning's
            ``SystemExit``), once the model is cleaned up.
        RecipeError: for an invalid recipe; with ``strict``, for one that leaves weights out.
    """
    residency = None
    if isinstance(model, CheckpointSource):
        residency = CheckpointResidency(model)
        model = model.model
    elif out_of_core is True:
        raise ValueError(
            f"out_of_core: reads the model from its checkpoint directory; pass the directory "
            f"as model, not a {type(model).__name__}"
        )
    elif out_of_core not in (False, "auto"):
        raise ValueError(f"out_of_core: expected True, False or 'auto', got {out_of_core!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if trainer is not None and (devices, strategy, trainer_kwargs) != (None, None, None):
        raise ValueError("pass either trainer or devices/strategy/trainer_kwargs, not both")
    if output_dir is not None and residency is None:
        # Imported here: the export needs the optional hf extra.
        from lightning_compress.export import check_output_dir, save_compressed

        check_output_dir(output_dir, overwrite_output_dir)
    logs_summary = summary is None
    summary = CompressionSummary() if summary is None else summary
    summary.measure_before(model)
    out_of_core_options = {}
    if residency is not None:
        out_of_core_options = {"tokenizer": tokenizer, "logs_summary": logs_summary}
    module = (CalibrationModule if residency is None else OutOfCoreCalibration)(
        model,
        recipe,
        residency=residency,
        **out_of_core_options,
        recipe_stage=recipe_stage,
        recipe_args=recipe_args,
        pipeline=pipeline if residency is None else _out_of_core_pipeline(pipeline, output_dir),
        sequential_targets=sequential_targets,
        device=device,
        offload_dir=offload_dir,
        propagate_compressed=propagate_compressed,
        staged=staged,
        moe_calibrate_all_experts=moe_calibrate_all_experts,
        progress=progress,
        strict=strict,
        summary=summary,
    )
    samples = None
    if dataset is not None:
        with summary.phase("data"):
            samples = calibration_samples(
                dataset,
                num_calibration_samples,
                max_seq_length,
                tokenizer,
                model,
                text_column=text_column,
                concatenate_data=concatenate_data,
            )
    if residency is not None:
        settings = {"batch_size": batch_size, "sequential_targets": sequential_targets}
        settings |= {"propagate_compressed": propagate_compressed, "staged": staged}
        settings["device"] = None if device is None else str(torch.device(device))
        inputs = run_inputs(residency.source, samples, settings)
        residency.open(output_dir, module.recipe, inputs, overwrite_output_dir)
    try:
        is_global_zero = _calibrate(
            module,
            samples,
            trainer,
            device,
            devices,
            strategy,
            trainer_kwargs,
            batch_size,
            tokenizer,
            pipeline,
            residency is not None,
        )
    finally:
        if residency is not None:
            residency.close()
    if output_dir is not None and is_global_zero and residency is None:
        recipe_text = module.session.get_serialized_recipe()
        with summary.phase("save"):
            save_compressed(
                model, output_dir, tokenizer, recipe_text, overwrite_output_dir, progress=progress
            )
    if output_dir is not None and is_global_zero:
        summary.record_checkpoint(output_dir)
    if logs_summary and is_global_zero:
        summary.log()
    return model if residency is None else weights_written_to(model, Path(output_dir))


def _calibrate(
    module: CalibrationModule,
    samples: list[Any] | None,
    trainer: pl.Trainer | None,
    device: torch.device | str | None,
    devices: int | str | list[int] | None,
    strategy: str | pl.strategies.Strategy | None,
    trainer_kwargs: dict[str, Any] | None,
    batch_size: int,
    tokenizer: Any | None,
    pipeline: str | None,
    out_of_core: bool,
) -> bool:
    """Runs the calibration (data-free without samples); returns whether this process
    reports it: rank zero, unless the run was in worker processes (out of core only), where
    rank zero reported it."""
    summary = module.summary
    if samples is None:
        with summary.phase("compress"):
            module.calibrate()
        return rank_and_world_size()[0] == 0
    with quiet_lightning(), summary.phase("compress"):
        if trainer is None:
            trainer = _trainer(device, devices, strategy, trainer_kwargs)
        if not out_of_core:
            _refuse_spawning(trainer)
        loader = calibration_loader(
            samples, batch_size, _pad_id(tokenizer), shard=not _shards_itself(trainer)
        )
        if pipeline == "auto" and not module.needs_calibration_data:
            logger.info("no modifier of the recipe needs calibration data: the data is not read")
            module.calibrate()
            return trainer.is_global_zero
        _validate(trainer, module, loader)
    return trainer.is_global_zero and not spawns_workers(trainer)


def _out_of_core_pipeline(pipeline: str | None, output_dir: str | Path | None) -> str:
    """The pipeline of an out-of-core run: the sequential one (without calibration data it
    compresses block by block too).

    Raises:
        ValueError: without ``output_dir``, or for another pipeline.
    """
    if output_dir is None:
        raise ValueError(
            "out_of_core: needs output_dir, where each compressed block is written (the "
            "weights are not kept in memory)"
        )
    if pipeline not in ("auto", "sequential", "data_free"):
        raise ValueError(
            f"pipeline={pipeline!r}: out_of_core calibrates one block at a time (sequential); "
            f"expected 'auto' or 'sequential'"
        )
    return "sequential"


def _validate(trainer: pl.Trainer, module: CalibrationModule, loader: DataLoader) -> None:
    """``trainer.validate(module)``, aborting the calibration whatever raises.

    Lightning answers Ctrl-C with its shutdown and ``SystemExit(1)``, and ignores SIGINT
    from then on; here the SIGINT handler is given back and the ``KeyboardInterrupt`` raised
    again, so that a caller's ``except KeyboardInterrupt`` runs.

    Raises:
        KeyboardInterrupt: after Ctrl-C, once everything is cleaned up.
    """
    try:
        with _sigint_handler_kept(), _progress_bar_hidden(trainer):
            trainer.validate(module, dataloaders=loader, verbose=False)
    except SystemExit as exit_:
        module.abort(exit_.__context__ or exit_)
        if isinstance(exit_.__context__, KeyboardInterrupt):
            raise exit_.__context__ from None
        raise
    except BaseException as error:
        module.abort(error)  # a no-op where the module's callback already did it
        raise


@contextmanager
def _sigint_handler_kept() -> Iterator[None]:
    """Puts the SIGINT handler back after the context, where a signal handler can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is not handler and handler is not None:
            signal.signal(signal.SIGINT, handler)


@contextmanager
def _progress_bar_hidden(trainer: pl.Trainer) -> Iterator[None]:
    """Hides the Trainer's own progress bar (a "Validation" bar over the calibration batches)
    inside the context: the calibration shows its own, over the blocks."""
    bar = trainer.progress_bar_callback
    if bar is None or bar.is_disabled:
        yield
        return
    bar.disable()
    try:
        yield
    finally:
        bar.enable()


def _pad_id(tokenizer: Any | None) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return pad_id if isinstance(pad_id, int) else 0


# ---------------------------------------------------------------- the run
def _trainer(
    device: torch.device | str | None,
    devices: int | str | list[int] | None,
    strategy: str | pl.strategies.Strategy | None,
    trainer_kwargs: dict[str, Any] | None,
) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "strategy": "auto",
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "use_distributed_sampler": False,
    }
    if device is not None:
        device = torch.device(device)
        settings["accelerator"] = "gpu" if device.type == "cuda" else device.type
        settings["devices"] = [device.index] if device.index is not None else 1
    if devices is not None:
        settings["devices"] = devices
    if strategy is not None:
        settings["strategy"] = strategy
    settings.update(trainer_kwargs or {})
    settings["inference_mode"] = False
    return pl.Trainer(**settings)


def _refuse_spawning(trainer: pl.Trainer) -> None:
    if spawns_workers(trainer):
        raise ValueError(
            f"strategy: {type(trainer.strategy).__name__} starts worker processes that cannot "
            f"hand the compressed model back to this one; use strategy='ddp' (run the script "
            f"with torchrun, or let Lightning launch it), or call "
            f"Trainer.validate(CalibrationModule(...)) and save inside the workers"
        )


def _shards_itself(trainer: pl.Trainer) -> bool:
    # Lightning exposes this Trainer flag only on its accelerator connector.
    return bool(trainer._accelerator_connector.use_distributed_sampler)
