"""Tokenizer files for a checkpoint, including a Hugging Face twin of the byte tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lightning_compress.bundled import ByteTokenizer

__all__ = ["byte_tokenizer_fast", "check_tokenizer", "save_tokenizer"]


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Writes ``tokenizer``'s files into ``directory``.

    Args:
        tokenizer: a transformers tokenizer (anything with ``save_pretrained``), or the
            bundled :class:`~lightning_compress.bundled.ByteTokenizer`, saved as its
            :func:`byte_tokenizer_fast` twin so that transformers and vLLM can load it.
        directory: where to write.

    Raises:
        TypeError: for any other object.
    """
    check_tokenizer(tokenizer)
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = byte_tokenizer_fast()
    tokenizer.save_pretrained(directory)


def check_tokenizer(tokenizer: Any, where: str = "tokenizer") -> None:
    """Checks that :func:`save_tokenizer` can write ``tokenizer``.

    Args:
        tokenizer: the object to check.
        where: what it was given as, for the message (e.g. ``Compressor.tokenizer``).

    Raises:
        TypeError: naming ``where`` unless ``tokenizer`` is a ``ByteTokenizer`` or has a
            ``save_pretrained`` method.
    """
    if not isinstance(tokenizer, ByteTokenizer) and not callable(
        getattr(tokenizer, "save_pretrained", None)
    ):
        raise TypeError(
            f"{where}: expected a transformers tokenizer (with save_pretrained) or a "
            f"ByteTokenizer, got {type(tokenizer).__name__}"
        )


def byte_tokenizer_fast() -> PreTrainedTokenizerFast:
    """A transformers tokenizer giving the same ids as ``ByteTokenizer``: one per UTF-8 byte.

    Returns:
        A byte-level BPE tokenizer without merges, token id = byte value.
    """
    byte_chars = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)
