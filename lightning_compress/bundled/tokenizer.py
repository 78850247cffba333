"""Byte-level tokenizer: every UTF-8 byte is one token, so the vocabulary has 256 entries."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back; needs no vocabulary file and never fails to encode."""

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids (256)."""
        return 256

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` as its UTF-8 bytes.

        Args:
            text: Text to encode.

        Returns:
            One token id in ``[0, 255]`` per byte.
        """
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Decode token ids back to text.

        Args:
            ids: Token ids in ``[0, 255]``, as a list or a 1-D tensor.

        Returns:
            The decoded text; invalid UTF-8 sequences become U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(ids).decode("utf-8", errors="replace")

    def __call__(
        self, text: str, return_tensors: str | None = None
    ) -> dict[str, list[int] | torch.Tensor]:
        """Encode ``text`` in the shape Hugging Face tokenizers return.

        Args:
            text: Text to encode.
            return_tensors: ``None`` for a list of ids, or ``"pt"`` for a ``[1, len]`` LongTensor.

        Returns:
            ``{"input_ids": ids}``.

        Raises:
            ValueError: If ``return_tensors`` is neither ``None`` nor ``"pt"``.
        """
        ids = self.encode(text)
        if return_tensors is None:
            return {"input_ids": ids}
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids], dtype=torch.long)}
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the files of :func:`byte_tokenizer_fast`, the transformers tokenizer giving
        the same ids, so that transformers and vLLM can load this tokenizer.

        Args:
            directory: where to write.

        Raises:
            ImportError: without the ``hf`` extra (transformers).
        """
        byte_tokenizer_fast().save_pretrained(directory)


def byte_tokenizer_fast() -> PreTrainedTokenizerFast:
    """A transformers tokenizer giving the same ids as ``ByteTokenizer``: one per UTF-8 byte.

    Returns:
        A byte-level BPE tokenizer without merges, token id = byte value.

    Raises:
        ImportError: without the ``hf`` extra (transformers, tokenizers).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)
