"""A DataModule for causal-LM training on text files, a list of texts, or token sequences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

__all__ = ["TextDataModule", "pack_tokens", "pad_tokens"]

Sample = dict[str, torch.Tensor]


class TextDataModule(pl.LightningDataModule):
    """Tokenized samples of ``seq_len`` tokens, split into training and validation.

    Exactly one source is given: ``files`` (UTF-8 text files, one document each), ``texts``
    (one document each) or ``tokens`` (token ids, one sequence per document). With ``pack``
    the documents are joined (separated by the tokenizer's end-of-sequence token when it has
    one) and cut into consecutive windows of ``seq_len`` tokens, the incomplete tail dropped;
    without it each document is one sample, cut to ``seq_len`` tokens and padded at the end
    with an ``attention_mask`` of 0 there. The last ``val_fraction`` of the samples (at least
    one) is the validation set; training batches are shuffled with a generator seeded by
    ``seed``, so the run is the same every time. Batches are mappings with ``input_ids`` and
    ``attention_mask``, as :class:`~lightning_compress.lightning.CausalLMModule` reads them.

    Args:
        tokenizer: a Hugging Face tokenizer, its name or directory (loaded with
            ``AutoTokenizer.from_pretrained``, so a LightningCLI config can name it), or any
            object with ``encode(text) -> list[int]`` (not needed for ``tokens``); its
            ``eos_token_id`` separates packed documents and its ``pad_token_id`` pads samples
            (0 when it has none).
        seq_len: tokens per sample.
        batch_size: samples per batch.
        files: text files to read.
        texts: texts.
        tokens: token-id sequences (1-D tensors or lists; a 2-D tensor's rows).
        pack: pack documents into full windows (True) or pad each one (False).
        val_fraction: share of the samples kept for validation, in ``[0, 1)``.
        seed: seed of the training shuffle.
        num_workers: DataLoader workers.

    Raises:
        ValueError: when not exactly one source is given, ``tokenizer`` is missing for text,
            ``seq_len``, ``batch_size`` or ``val_fraction`` is out of range, or the data
            gives fewer than two samples (one to train, one to validate).
    """

    def __init__(
        self,
        tokenizer: Any | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        files: Sequence[str | os.PathLike] | None = None,
        texts: Sequence[str] | None = None,
        tokens: Sequence[Sequence[int]] | torch.Tensor | None = None,
        pack: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        given = [
            name
            for name, v in (("files", files), ("texts", texts), ("tokens", tokens))
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "TextDataModule: expected exactly one of files, texts or tokens, got "
                f"{given or 'none'}"
            )
        if tokens is None and tokenizer is None:
            raise ValueError(f"tokenizer: needed to tokenize {given[0]}, got None")
        if seq_len < 2:
            raise ValueError(f"seq_len: expected an integer >= 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction: expected a number in [0, 1), got {val_fraction}")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.files = files
        self.texts = texts
        self.tokens = tokens
        self.pack = pack
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers

    def setup(self, stage: str) -> None:
        documents = self._documents()
        if self.pack:
            samples = pack_tokens(documents, self.seq_len, _special(self.tokenizer, "eos_token_id"))
        else:
            samples = pad_tokens(
                documents, self.seq_len, _special(self.tokenizer, "pad_token_id") or 0
            )
        if len(samples) < 2:
            raise ValueError(
                f"TextDataModule: the data gives {len(samples)} sample(s) of "
                f"seq_len={self.seq_len}; expected at least 2 (training and validation)"
            )
        val = min(len(samples) - 1, max(1, round(len(samples) * self.val_fraction)))
        self.train_data = samples[: len(samples) - val]
        self.val_data = samples[len(samples) - val :]

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_data,
            self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, self.batch_size, num_workers=self.num_workers)

    def _documents(self) -> list[list[int]]:
        """Token ids of each document."""
        if self.tokens is not None:
            return [[int(t) for t in doc] for doc in self.tokens]
        texts = self.texts
        if texts is None:
            texts = [Path(path).read_text(encoding="utf-8") for path in self.files]
        return [_encode(self.tokenizer, text) for text in texts]


def pack_tokens(documents: Sequence[Sequence[int]], seq_len: int, eos: int | None) -> list[Sample]:
    """Join documents (``eos`` after each, when given) and cut full windows of ``seq_len``.

    Args:
        documents: token ids of each document.
        seq_len: tokens per window.
        eos: separator token id, or None.

    Returns:
        Samples with ``input_ids`` and an all-ones ``attention_mask``, ``[seq_len]`` each;
        the tokens after the last full window are dropped.
    """
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        if eos is not None:
            stream.append(eos)
    windows = torch.tensor(stream[: len(stream) // seq_len * seq_len], dtype=torch.long)
    return [
        {"input_ids": window, "attention_mask": torch.ones_like(window)}
        for window in windows.view(-1, seq_len)
    ]


def pad_tokens(documents: Sequence[Sequence[int]], seq_len: int, pad: int) -> list[Sample]:
    """Each document as one sample: its first ``seq_len`` tokens, padded at the end with ``pad``.

    Args:
        documents: token ids of each document.
        seq_len: tokens per sample.
        pad: the padding token id.

    Returns:
        Samples with ``input_ids`` and ``attention_mask`` (0 on padding), ``[seq_len]`` each;
        documents with fewer than two tokens (nothing to predict) are left out.
    """
    samples = []
    for doc in documents:
        ids = list(doc[:seq_len])
        if len(ids) < 2:
            continue
        mask = [1] * len(ids) + [0] * (seq_len - len(ids))
        ids += [pad] * (seq_len - len(ids))
        samples.append(
            {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long),
            }
        )
    return samples


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text``, without the special tokens a Hugging Face tokenizer adds."""
    if hasattr(tokenizer, "all_special_ids"):  # a Hugging Face tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def _special(tokenizer: Any, name: str) -> int | None:
    """A special token id of the tokenizer, or None."""
    return getattr(tokenizer, name, None)
