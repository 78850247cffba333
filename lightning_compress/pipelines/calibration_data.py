"""Calibration data: samples from every accepted dataset form, checked, then padded into batches.

Files: ``calibration_samples(path, num_samples, max_seq_length, tokenizer, text_column="text",
concatenate_data=None)`` reads a ``.txt``, ``.json``, ``.jsonl``, ``.parquet`` or ``.arrow``
file (see ``dataset_files``), as ``oneshot(dataset=path)`` does.

Each sample is checked where it is read (a DataLoader's batches one by one, as they arrive), so
bad data fails before calibration starts, with an error that says where and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import torch
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_compress.core.distributed import ShardSampler
from lightning_compress.pipelines.dataset_files import dataset_path, is_text_file, read_items

__all__ = [
    "DATASET_FORMS",
    "Sample",
    "calibration_loader",
    "calibration_samples",
    "check_token_batch",
]

Sample = dict[str, torch.Tensor]
DATASET_FORMS = (
    "a LongTensor [N, L] of token ids, a list of dicts with 'input_ids' (and optionally "
    "'attention_mask'), a torch Dataset, a DataLoader, a Hugging Face datasets.Dataset, the "
    "path of a .txt, .json, .jsonl, .parquet or .arrow file, or text (a string or a list of "
    "strings) with a tokenizer"
)
MESSAGES = "messages"  # the column of chat records
BATCH_FORMS = (
    "a [B, L] tensor of token ids, a dict with 'input_ids' [B, L] (and optionally "
    "'attention_mask' [B, L]), or a tuple (input_ids,) or (input_ids, attention_mask)"
)


def calibration_samples(
    dataset: Any,
    num_samples: int | None,
    max_seq_length: int,
    tokenizer: Any | None = None,
    model: nn.Module | None = None,
    text_column: str = "text",
    concatenate_data: bool | None = None,
) -> list[Sample]:
    """Turn any accepted ``dataset`` into samples ``{"input_ids": [L], "attention_mask"?}``.

    Token ids must be non-negative integers (not floats or bools) and masks hold only 0 and
    1, in the shape of the ids. With ``model``, ids must also be below its vocabulary size
    (its input embedding's rows, else ``config.vocab_size``) and samples no longer than its
    ``config.max_position_embeddings``.

    Args:
        dataset: a LongTensor ``[N, L]`` of token ids, a list of dicts with
            ``input_ids`` (and optionally ``attention_mask``), a torch ``Dataset``, a
            ``DataLoader`` (its batches, ``[B, L]`` tensors, dicts or ``(input_ids,
            attention_mask)`` tuples, are split into samples), a Hugging Face
            ``datasets.Dataset`` (``input_ids``, text or ``messages`` column), the path of a
            data file (``.txt``, ``.json``, ``.jsonl``, ``.parquet``, ``.arrow``, or a
            ``save_to_disk`` directory; a string that looks like a path must exist, a dataset
            name is refused: see ``dataset_files``), or text (a string with spaces or lines,
            cut into windows, or a list of strings) with a tokenizer. Records hold
            ``input_ids``, text in ``text_column``, or chat ``messages`` (lists of
            ``{"role", "content"}``, rendered by the tokenizer's chat template); records
            with empty text are skipped with a warning.
        num_samples: how many samples to take from the start; None takes all.
        max_seq_length: samples are truncated to this many tokens.
        tokenizer: needed for text.
        model: the model the samples are for; None skips the checks against it.
        text_column: the records' column that holds their text; where records lack the
            default ``"text"``, a ``messages`` column is read as chat.
        concatenate_data: for data files only: True joins the records' tokens and cuts them
            into windows of ``max_seq_length`` tokens (a shorter last window is dropped
            unless it is the only one); False takes one sample per record (a ``.txt`` file:
            per non-blank line), truncated; None (the default) windows ``.txt`` files and
            takes one sample per record of the others.

    Returns:
        The samples, as 1-D LongTensors.

    Raises:
        TypeError: if ``dataset`` (or one of its items or batches) has no accepted form, or
            holds ids that are not integers, or a record lacks ``text_column``.
        ValueError: for non-positive sizes, fewer samples than ``num_samples``, negative or
            out-of-vocabulary ids, masks with values other than 0 and 1 or another shape
            than the ids, samples longer than the model's positions, a dataset name, an
            unreadable data file, chat records without a chat template, or
            ``concatenate_data`` set for data that is no file.
        FileNotFoundError: if ``dataset`` is a path, or a string that looks like one, and
            does not exist.
        ImportError: for Parquet or Arrow files without the ``data`` extra.
    """
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_calibration_samples: expected a positive int, got {num_samples}")
    if max_seq_length <= 0:
        raise ValueError(f"max_seq_length: expected a positive int, got {max_seq_length}")
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column: expected a column name, got {text_column!r}")
    if concatenate_data not in (None, True, False):
        raise ValueError(
            f"concatenate_data: expected True, False or None, got {concatenate_data!r}"
        )
    limits = _TokenLimits.of(model) if model is not None else _TokenLimits()
    items = _items(dataset, tokenizer, max_seq_length, _Text(text_column, concatenate_data))
    samples = []
    for where, sample in islice(items, num_samples):
        sample = _truncated(sample, max_seq_length)
        limits.check(sample["input_ids"], where)
        samples.append(sample)
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


def check_token_batch(model: nn.Module, batch: Any, index: int) -> None:
    """Check a calibration batch of token ids for ``model`` as it arrives.

    Batches that carry no token ids (``model`` has no input embedding or vocabulary size, or
    a dict without ``input_ids``) are left to the model.

    Args:
        model: the model the batch is for.
        batch: a ``[B, L]`` tensor, a dict with ``input_ids`` (and ``attention_mask``), or a
            tuple ``(input_ids, attention_mask)``.
        index: the batch's position, named in errors.

    Raises:
        TypeError: as ``calibration_samples``.
        ValueError: as ``calibration_samples`` with ``model``.
    """
    limits = _TokenLimits.of(model)
    if limits.vocab_size is None or (isinstance(batch, Mapping) and "input_ids" not in batch):
        return
    for where, sample in _unbatched(batch, f"calibration batch {index}"):
        limits.check(sample["input_ids"], where)


# ------------------------------------------------------------- model limits
@dataclass(frozen=True)
class _TokenLimits:
    """The token ids and lengths a model accepts (None: not known, not checked)."""

    vocab_size: int | None = None
    max_positions: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> _TokenLimits:
        """The limits read from ``model``'s input embedding and config."""
        return cls(_vocab_size(model), _config_int(model, "max_position_embeddings"))

    def check(self, ids: torch.Tensor, where: str) -> None:
        """Raise a ValueError naming ``where`` if ``ids`` exceed the limits."""
        if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"{where}: token id {int(ids.max())} is outside the model's vocabulary; "
                f"expected ids below {self.vocab_size} (the input embedding's size): was the "
                f"data tokenized with this model's tokenizer?"
            )
        if self.max_positions is not None and len(ids) > self.max_positions:
            raise ValueError(
                f"{where}: {len(ids)} tokens, more than the model's {self.max_positions} "
                f"positions (config.max_position_embeddings); expected at most "
                f"{self.max_positions} tokens per sample: lower max_seq_length or cut the data"
            )


def _vocab_size(model: nn.Module) -> int | None:
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    return _config_int(model, "vocab_size")


def _config_int(model: nn.Module, name: str) -> int | None:
    value = getattr(getattr(model, "config", None), name, None)
    return value if isinstance(value, int) and value > 0 else None


# ----------------------------------------------------------------- datasets
@dataclass(frozen=True)
class _Text:
    """How text records become samples: their column and whether they are joined."""

    column: str = "text"
    concatenate: bool | None = None


def _items(
    dataset: Any, tokenizer: Any | None, max_seq_length: int, text: _Text
) -> Iterator[tuple[str, Sample]]:
    """Every sample of ``dataset``, checked, with where it came from."""
    path = dataset_path(dataset) if isinstance(dataset, (str, os.PathLike)) else None
    if path is not None:
        windows = is_text_file(path) if text.concatenate is None else text.concatenate
        items = read_items(path, whole_text=windows)
        samples = _records(items, tokenizer, text.column)
        yield from _windows(samples, max_seq_length, str(path)) if windows else samples
        return
    if text.concatenate is not None:
        raise ValueError(
            f"concatenate_data: applies to data files only; got {text.concatenate!r} with a "
            f"{type(dataset).__name__}: leave it None"
        )
    if isinstance(dataset, str):
        yield from _windows(_records([("dataset text", dataset)], tokenizer), max_seq_length)
    elif isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or not _holds_integers(dataset):
            raise TypeError(
                f"dataset: a tensor must hold integer token ids of shape [N, L], got "
                f"{dataset.dtype} of shape {list(dataset.shape)}"
            )
        for index, row in enumerate(dataset):
            where = f"dataset row {index}"
            yield where, _sample(row, tokenizer, where)
    elif isinstance(dataset, DataLoader):
        for index, batch in enumerate(dataset):
            yield from _unbatched(batch, f"dataset batch {index}")
    elif isinstance(dataset, (Dataset, list, tuple)) or _is_hf_dataset(dataset):
        items = ((f"dataset item {index}", item) for index, item in enumerate(_iterate(dataset)))
        yield from _records(items, tokenizer, text.column)
    else:
        raise TypeError(f"dataset: expected {DATASET_FORMS}; got {type(dataset).__name__}")


def _is_hf_dataset(dataset: Any) -> bool:
    return hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__")


def _iterate(dataset: Any) -> Iterable[Any]:
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return (dataset[index] for index in range(len(dataset)))
    return dataset


def _records(
    items: Iterable[tuple[str, Any]], tokenizer: Any | None, text_column: str = "text"
) -> Iterator[tuple[str, Sample]]:
    """The samples of ``items``; those with empty text are skipped, with one warning."""
    skipped = False
    for where, item in items:
        sample = _sample(item, tokenizer, where, text_column)
        if sample is not None:
            yield where, sample
        elif not skipped:
            skipped = True
            logger.warning(f"{where}: empty text, skipped (as is every record with empty text)")


def _sample(
    item: Any, tokenizer: Any | None, where: str, text_column: str = "text"
) -> Sample | None:
    """``item`` as a sample; None for empty text."""
    if isinstance(item, (tuple, list)) and _all_tensors(item):
        item = _ids_and_mask(item, where)
    if isinstance(item, str):
        return _text_sample(item, tokenizer, where)
    if isinstance(item, torch.Tensor):
        return {"input_ids": _as_ids(item, where)}
    if isinstance(item, Mapping):
        if "input_ids" in item:
            sample = {"input_ids": _as_ids(item["input_ids"], where)}
            if item.get("attention_mask") is not None:
                sample["attention_mask"] = _as_mask(item["attention_mask"], sample, where)
            return sample
        if text_column in item:
            return _column_sample(item[text_column], tokenizer, f"{where}, {text_column!r}")
        if MESSAGES in item and text_column == "text":
            return _chat_sample(item[MESSAGES], tokenizer, f"{where}, {MESSAGES!r}")
        raise TypeError(
            f"{where} has keys {sorted(item)}; expected 'input_ids' (token ids), "
            f"{text_column!r} (text, with a tokenizer; text_column names the column that "
            f"holds it) or {MESSAGES!r} (chat, with a tokenizer that has a chat template)"
        )
    raise TypeError(
        f"{where} is a {type(item).__name__}; expected a dict with 'input_ids', a 1-D tensor "
        f"of token ids, a tuple (input_ids, attention_mask) of tensors, or a string (with a "
        f"tokenizer)"
    )


def _unbatched(batch: Any, where: str) -> Iterator[tuple[str, Sample]]:
    found = type(batch).__name__
    if isinstance(batch, (tuple, list)) and _all_tensors(batch):
        batch = _ids_and_mask(batch, where)
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or batch.get("input_ids") is None:
        raise TypeError(f"{where}: a DataLoader batch is a {found}; expected {BATCH_FORMS}")
    ids = _batch_field(batch, "input_ids", where)
    if ids.dim() != 2:
        raise TypeError(
            f"{where}: a DataLoader batch is a {found} with input_ids of shape "
            f"{list(ids.shape)}; expected {BATCH_FORMS}"
        )
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = _batch_field(batch, "attention_mask", where)
        if mask.shape[:1] != ids.shape[:1]:
            raise ValueError(
                f"{where}: attention_mask has shape {list(mask.shape)}; expected one row per "
                f"row of input_ids ({len(ids)})"
            )
    for row in range(len(ids)):
        item = {"input_ids": ids[row], "attention_mask": None if mask is None else mask[row]}
        yield f"{where}, row {row}", _sample(item, None, f"{where}, row {row}")


def _batch_field(batch: Mapping, field: str, where: str) -> torch.Tensor:
    """A batch's ``field`` as one tensor; a list of tensors is refused, not transposed."""
    value = batch[field]
    if isinstance(value, (tuple, list)) and _all_tensors(value):
        raise TypeError(
            f"{where}: {field} is a list of {len(value)} tensors; expected a [B, L] tensor "
            f"(a DataLoader's default collate makes one tensor per position of items that hold "
            f"lists): give the items' {field} as tensors, or a collate_fn that returns [B, L] "
            f"tensors"
        )
    return _as_tensor(value, field, where)


def _all_tensors(values: tuple | list) -> bool:
    return bool(values) and all(isinstance(value, torch.Tensor) for value in values)


def _ids_and_mask(values: tuple | list, where: str) -> dict[str, torch.Tensor]:
    """``(input_ids,)`` or ``(input_ids, attention_mask)`` as a dict."""
    if len(values) > 2:
        raise TypeError(
            f"{where} is a {type(values).__name__} of {len(values)} tensors; expected "
            f"(input_ids,) or (input_ids, attention_mask): pass other fields in a dict"
        )
    return dict(zip(("input_ids", "attention_mask"), values, strict=False))


def _windows(
    samples: Iterable[tuple[str, Sample]], length: int, name: str = "dataset text"
) -> Iterator[tuple[str, Sample]]:
    """The samples' tokens joined and cut into windows of ``length`` tokens.

    A shorter last window is dropped unless it is the only one.
    """
    held: list[torch.Tensor] = []
    index = 0
    for where, sample in samples:
        mask = sample.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError(
                f"{where}: attention_mask masks tokens out, which joined windows would feed to "
                f"the model; expected unpadded records, or concatenate_data=False"
            )
        held.append(sample["input_ids"])
        ids = torch.cat(held)
        full = len(ids) // length * length
        for start in range(0, full, length):  # not split(): an empty tensor splits into one
            yield f"{name} window {index}", {"input_ids": ids[start : start + length]}
            index += 1
        held = [ids[full:]]
    if index == 0 and held and len(held[0]):
        yield f"{name} window 0", {"input_ids": held[0]}


def _column_sample(value: Any, tokenizer: Any | None, where: str) -> Sample | None:
    if isinstance(value, str):
        return _text_sample(value, tokenizer, where)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
        return _chat_sample(value, tokenizer, where)
    raise TypeError(
        f"{where} is a {type(value).__name__}; expected a string (text) or a list of chat messages"
    )


def _text_sample(text: str, tokenizer: Any | None, where: str) -> Sample | None:
    if not text.strip():
        return None
    return {"input_ids": _as_ids(_tokenizer(tokenizer)(text)["input_ids"], where)}


def _chat_sample(messages: Any, tokenizer: Any | None, where: str) -> Sample:
    """Chat ``messages`` rendered by the tokenizer's chat template, then tokenized."""
    tokenizer = _tokenizer(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}: chat records are rendered by the tokenizer's chat template, and this "
            f"{type(tokenizer).__name__} has none; expected a tokenizer with a chat template, "
            f"or records with text (text_column names the column that holds it)"
        )
    if not (
        isinstance(messages, (list, tuple))
        and messages
        and all(isinstance(m, Mapping) and {"role", "content"} <= m.keys() for m in messages)
    ):
        raise TypeError(
            f"{where}: expected a non-empty list of {{'role': ..., 'content': ...}} messages, "
            f"got {messages!r:.80}"
        )
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    # The template writes the special tokens (BOS, turn markers) itself.
    return {"input_ids": _as_ids(tokenizer(text, add_special_tokens=False)["input_ids"], where)}


def _tokenizer(tokenizer: Any | None) -> Any:
    if tokenizer is None:
        raise TypeError("dataset: text needs a tokenizer; pass tokenizer=...")
    return tokenizer


def _as_tensor(value: Any, field: str, where: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{where}: {field} must be a sequence of integers, got {type(value).__name__} ({error})"
        ) from error


def _holds_integers(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _as_ids(value: Any, where: str) -> torch.Tensor:
    ids = _as_tensor(value, "input_ids", where)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0 or not _holds_integers(ids):
        raise TypeError(
            f"{where}: token ids must be a non-empty 1-D sequence of integers (not floats or "
            f"bools), got {ids.dtype} of shape {list(ids.shape)}"
        )
    if int(ids.min()) < 0:
        raise ValueError(f"{where}: token id {int(ids.min())} is negative; expected ids >= 0")
    return ids.long()


def _as_mask(value: Any, sample: Sample, where: str) -> torch.Tensor:
    mask = _as_tensor(value, "attention_mask", where)
    ids = sample["input_ids"]
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != ids.shape:
        raise ValueError(
            f"{where}: attention_mask has shape {list(mask.shape)}; expected the shape of "
            f"input_ids, {list(ids.shape)}"
        )
    invalid = mask[(mask != 0) & (mask != 1)]
    if invalid.numel():
        raise ValueError(
            f"{where}: attention_mask holds {invalid[0].item()}; expected only 0 (padding) "
            f"and 1 (token)"
        )
    return mask.long()


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
