"""Tokenizer files for a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["check_tokenizer", "save_tokenizer"]


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Writes ``tokenizer``'s files into ``directory``.

    Args:
        tokenizer: a transformers tokenizer, or anything with a ``save_pretrained`` method
            that writes transformers tokenizer files (the bundled
            :class:`~lightning_compress.bundled.ByteTokenizer` writes its transformers twin).
        directory: where to write.

    Raises:
        TypeError: for any other object.
    """
    check_tokenizer(tokenizer)
    tokenizer.save_pretrained(directory)


def check_tokenizer(tokenizer: Any, where: str = "tokenizer") -> None:
    """Checks that :func:`save_tokenizer` can write ``tokenizer``.

    Args:
        tokenizer: the object to check.
        where: what it was given as, for the message (e.g. ``Compressor.tokenizer``).

    Raises:
        TypeError: naming ``where`` unless ``tokenizer`` has a ``save_pretrained`` method.
    """
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(
            f"{where}: expected a transformers tokenizer (with save_pretrained) or the bundled "
            f"ByteTokenizer, got {type(tokenizer).__name__}"
        )
