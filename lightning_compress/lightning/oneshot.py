"""``oneshot()``: post-training compression of a model in one call."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_compress.core.distributed import ShardSampler, rank_and_world_size
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.recipe import RecipeArgsInput, RecipeInput, RecipeStageInput

__all__ = ["calibration_loader", "calibration_samples", "oneshot"]

Sample = dict[str, torch.Tensor]
DATASET_FORMS = (
    "a LongTensor [N, L] of token ids, a list of dicts with 'input_ids' (and optionally "
    "'attention_mask'), a torch Dataset, a DataLoader, a Hugging Face datasets.Dataset, or "
    "text (a string or a list of strings) with a tokenizer"
)


def oneshot(
    model: nn.Module,
    recipe: RecipeInput,
    dataset: Any | None = None,
    num_calibration_samples: int | None = 512,
    max_seq_length: int = 2048,
    output_dir: str | Path | None = None,
    pipeline: str = "auto",
    sequential_targets: list[str] | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    offload_dir: str | Path | None = None,
    recipe_stage: RecipeStageInput | None = None,
    recipe_args: RecipeArgsInput | None = None,
    tokenizer: Any | None = None,
    devices: int | str | list[int] | None = None,
    strategy: str | pl.strategies.Strategy | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    propagate_compressed: bool = True,
    staged: bool = True,
    trainer: pl.Trainer | None = None,
    overwrite_output_dir: bool = False,
) -> nn.Module:
    """Compress ``model`` after training: calibrate on ``dataset`` and apply ``recipe``.

    The calibration runs as ``Trainer(inference_mode=False).validate(CalibrationModule)``
    (one process by default); without a dataset the recipe runs data-free, without a Trainer.
    The sequential pipeline keeps the model where it is and runs one block at a time on
    ``device``. The model is compressed in place.

    On an exception the model keeps no hook and no modifier buffer; blocks compressed before
    the failure stay compressed, the block whose compression failed is restored (see
    ``CalibrationModule``).

    Args:
        model: the model to compress (e.g. a Hugging Face causal LM).
        recipe: the recipe (path, YAML text, dict, modifiers).
        dataset: the calibration data: a LongTensor ``[N, L]`` of token ids, a list of dicts with
            ``input_ids`` (and optionally ``attention_mask``), a torch ``Dataset``, a
            ``DataLoader`` (its batches are split into samples), a Hugging Face
            ``datasets.Dataset`` (``input_ids`` or ``text`` column), or text (a string, cut
            into windows, or a list of strings) with a tokenizer; None runs data-free.
        num_calibration_samples: samples to take from the start of ``dataset``; None takes all.
        max_seq_length: samples are truncated to this many tokens (text is cut into windows
            of this length).
        output_dir: save the compressed model here, in the compressed-tensors format that
            transformers and vLLM load (``lightning_compress.export.save_compressed``, with
            the tokenizer and the recipe; needs the ``hf`` extra). Checked before calibrating.
        pipeline: ``auto``, ``sequential``, ``basic`` or ``data_free``. ``auto`` runs
            ``data_free`` (without reading ``dataset``) when no modifier needs calibration
            data (weight-only RTN, dynamic activations), else ``sequential`` where the model
            has repeated blocks, else ``basic``.
        sequential_targets: class names of the blocks for the sequential pipeline.
        batch_size: samples per calibration batch (padded to the longest).
        device: where blocks run (``"cuda"``); None: the Trainer's device.
        offload_dir: spill the activation cache to this directory instead of CPU memory.
        recipe_stage: the stage or stages of the recipe to run.
        recipe_args: values for the recipe's ``${args.name}`` interpolations.
        tokenizer: tokenizes text data; saved with the model; its ``pad_token_id`` pads.
        devices: the Trainer's ``devices`` (several processes split the data).
        strategy: the Trainer's ``strategy``, e.g. ``"ddp"``; spawning strategies are refused.
        trainer_kwargs: more ``Trainer`` arguments (they override the defaults, except
            ``inference_mode``, which calibration needs off).
        propagate_compressed: feed each block the compressed previous block's outputs.
        staged: calibrate blocks in one forward that compresses each group of layers
            when every batch reaches it (see ``PipelineOptions``).
        trainer: run on this Trainer (built with ``inference_mode=False``) instead of one
            built from ``device``, ``devices``, ``strategy`` and ``trainer_kwargs``.
        overwrite_output_dir: replace ``output_dir`` if it exists and is not empty.

    Returns:
        ``model``, compressed.

    Raises:
        TypeError: if ``model`` or ``dataset`` has the wrong type.
        ValueError: for bad sizes, too little data, a spawning strategy, or ``trainer``
            together with Trainer settings.
        ExportError: if ``output_dir`` exists and is not empty (without
            ``overwrite_output_dir``), or the compressed model cannot be exported.
        ImportError: if ``output_dir`` is set but the ``hf`` extra is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if trainer is not None and (devices, strategy, trainer_kwargs) != (None, None, None):
        raise ValueError("pass either trainer or devices/strategy/trainer_kwargs, not both")
    if output_dir is not None:
        # Imported here: the export needs the optional hf extra.
        from lightning_compress.export import check_output_dir, save_compressed

        check_output_dir(output_dir, overwrite_output_dir)
    module = CalibrationModule(
        model,
        recipe,
        recipe_stage=recipe_stage,
        recipe_args=recipe_args,
        pipeline=pipeline,
        sequential_targets=sequential_targets,
        device=device,
        offload_dir=offload_dir,
        propagate_compressed=propagate_compressed,
        staged=staged,
    )
    if dataset is None:
        module.calibrate()
        is_global_zero = rank_and_world_size()[0] == 0
    else:
        samples = calibration_samples(dataset, num_calibration_samples, max_seq_length, tokenizer)
        if trainer is None:
            trainer = _trainer(device, devices, strategy, trainer_kwargs)
        _refuse_spawning(trainer)
        loader = calibration_loader(
            samples, batch_size, _pad_id(tokenizer), shard=not _shards_itself(trainer)
        )
        if pipeline == "auto" and not module.needs_calibration_data:
            logger.info("no modifier of the recipe needs calibration data: the data is not read")
            module.calibrate()
        else:
            trainer.validate(module, dataloaders=loader, verbose=False)
        is_global_zero = trainer.is_global_zero
    if output_dir is not None and is_global_zero:
        recipe_text = module.session.get_serialized_recipe()
        save_compressed(model, output_dir, tokenizer, recipe_text, overwrite_output_dir)
    return model


def calibration_samples(
    dataset: Any,
    num_samples: int | None,
    max_seq_length: int,
    tokenizer: Any | None = None,
) -> list[Sample]:
    """Turn any accepted ``dataset`` into samples ``{"input_ids": [L], "attention_mask"?}``.

    Args:
        dataset: a LongTensor ``[N, L]`` of token ids, a list of dicts with
            ``input_ids`` (and optionally ``attention_mask``), a torch ``Dataset``, a
            ``DataLoader`` (its batches are split into samples), a Hugging Face
            ``datasets.Dataset`` (``input_ids`` or ``text`` column), or text (a string, cut
            into windows, or a list of strings) with a tokenizer.
        num_samples: how many samples to take from the start; None takes all.
        max_seq_length: samples are truncated to this many tokens.
        tokenizer: needed for text.

    Returns:
        The samples, as 1-D LongTensors.

    Raises:
        TypeError: if ``dataset`` (or one of its items) has no accepted form.
        ValueError: for non-positive sizes, or fewer samples than ``num_samples``.
    """
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_calibration_samples: expected a positive int, got {num_samples}")
    if max_seq_length <= 0:
        raise ValueError(f"max_seq_length: expected a positive int, got {max_seq_length}")
    items = _items(dataset, tokenizer, max_seq_length)
    samples = [_truncated(sample, max_seq_length) for sample in islice(items, num_samples)]
    if not samples or (num_samples is not None and len(samples) < num_samples):
        raise ValueError(
            f"calibration data shorter than asked: {len(samples)} samples available, "
            f"num_calibration_samples={num_samples}; lower num_calibration_samples or give "
            f"more data"
        )
    return samples


def calibration_loader(
    samples: list[Sample], batch_size: int = 1, pad_id: int = 0, shard: bool = True
) -> DataLoader:
    """A DataLoader over ``samples`` that pads each batch and shards it across ranks.

    With ``shard`` each rank takes every ``world_size``-th sample without repeats
    (``ShardSampler``); run it with ``Trainer(use_distributed_sampler=False)``.

    Args:
        samples: the samples from ``calibration_samples``.
        batch_size: samples per batch.
        pad_id: the token id used for padding.
        shard: shard across ranks here (else the Trainer's sampler does, repeating samples
            when the ranks' shares are uneven).

    Returns:
        The DataLoader; its batches are dicts with ``input_ids`` and, when some sample is
        padded or came with one, ``attention_mask``.

    Raises:
        ValueError: if ``batch_size`` is not positive.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    return DataLoader(
        samples,
        batch_size=batch_size,
        sampler=ShardSampler(len(samples)) if shard else None,
        collate_fn=partial(_pad, pad_id=pad_id),
    )


# ----------------------------------------------------------------- datasets
def _items(dataset: Any, tokenizer: Any | None, max_seq_length: int) -> Iterator[Sample]:
    if isinstance(dataset, str):
        yield from _text_windows(dataset, tokenizer, max_seq_length)
    elif isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or dataset.is_floating_point() or dataset.is_complex():
            raise TypeError(
                f"dataset: a tensor must hold integer token ids of shape [N, L], got "
                f"{dataset.dtype} of shape {list(dataset.shape)}"
            )
        yield from ({"input_ids": row} for row in dataset)
    elif isinstance(dataset, DataLoader):
        for batch in dataset:
            yield from _unbatched(batch)
    elif isinstance(dataset, (Dataset, list, tuple)) or _is_hf_dataset(dataset):
        for item in _iterate(dataset):
            yield _sample(item, tokenizer)
    else:
        raise TypeError(f"dataset: expected {DATASET_FORMS}; got {type(dataset).__name__}")


def _is_hf_dataset(dataset: Any) -> bool:
    return hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__")


def _iterate(dataset: Any) -> Iterable[Any]:
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return (dataset[index] for index in range(len(dataset)))
    return dataset


def _sample(item: Any, tokenizer: Any | None) -> Sample:
    if isinstance(item, str):
        return {"input_ids": _as_ids(_tokenize(item, tokenizer))}
    if isinstance(item, torch.Tensor):
        return {"input_ids": _as_ids(item)}
    if isinstance(item, Mapping):
        if "input_ids" in item:
            sample = {"input_ids": _as_ids(item["input_ids"])}
            if item.get("attention_mask") is not None:
                sample["attention_mask"] = _as_ids(item["attention_mask"])
            return sample
        if "text" in item:
            return {"input_ids": _as_ids(_tokenize(item["text"], tokenizer))}
        raise TypeError(
            f"dataset: an item has keys {sorted(item)}; expected 'input_ids' (token ids) or "
            f"'text' (with a tokenizer)"
        )
    raise TypeError(
        f"dataset: an item is a {type(item).__name__}; expected a dict with 'input_ids', a "
        f"1-D tensor of token ids, or a string (with a tokenizer)"
    )


def _unbatched(batch: Any) -> Iterator[Sample]:
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if isinstance(batch, torch.Tensor) and batch.dim() == 2:
        yield from ({"input_ids": row} for row in batch)
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        for index in range(len(batch["input_ids"])):
            yield _sample({key: value[index] for key, value in batch.items()}, None)
    else:
        raise TypeError(
            f"dataset: a DataLoader batch is a {type(batch).__name__}; expected a [B, L] "
            f"tensor of token ids or a dict with 'input_ids' [B, L]"
        )


def _text_windows(text: str, tokenizer: Any | None, length: int) -> Iterator[Sample]:
    ids = _as_ids(_tokenize(text, tokenizer))
    for window in ids.split(length):
        if len(window) == length or len(ids) < length:
            yield {"input_ids": window}


def _tokenize(text: str, tokenizer: Any | None) -> Any:
    if tokenizer is None:
        raise TypeError("dataset: text needs a tokenizer; pass tokenizer=...")
    return tokenizer(text)["input_ids"]


def _as_ids(value: Any) -> torch.Tensor:
    ids = torch.as_tensor(value)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.is_floating_point() or ids.numel() == 0:
        raise TypeError(
            f"dataset: token ids must be a non-empty 1-D sequence of integers, got "
            f"{ids.dtype} of shape {list(ids.shape)}"
        )
    return ids.long()


def _truncated(sample: Sample, length: int) -> Sample:
    return {key: value[:length] for key, value in sample.items()}


def _pad(batch: list[Sample], pad_id: int) -> Sample:
    longest = max(len(sample["input_ids"]) for sample in batch)
    needs_mask = any(
        "attention_mask" in sample or len(sample["input_ids"]) < longest for sample in batch
    )
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, sample in enumerate(batch):
        length = len(sample["input_ids"])
        input_ids[row, :length] = sample["input_ids"]
        attention_mask[row, :length] = sample.get("attention_mask", 1)
    if not needs_mask:
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise ValueError(
            f"strategy: {type(trainer.strategy).__name__} starts worker processes that cannot "
            f"hand the compressed model back to this one; use strategy='ddp' (run the script "
            f"with torchrun, or let Lightning launch it), or call "
            f"Trainer.validate(CalibrationModule(...)) and save inside the workers"
        )


def _shards_itself(trainer: pl.Trainer) -> bool:
    # Lightning exposes this Trainer flag only on its accelerator connector.
    return bool(trainer._accelerator_connector.use_distributed_sampler)
