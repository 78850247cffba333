"""Load the bundled checkpoint, its tokenizer and the bundled calibration/evaluation text."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_compress.bundled.model import TinyDecoder, TinyDecoderConfig
from lightning_compress.bundled.tokenizer import ByteTokenizer

DATA_DIR = Path(__file__).resolve().parent / "data"
CHECKPOINT_NAME = "tiny_decoder.safetensors"
CONFIG_NAME = "tiny_decoder.json"
TEXT_NAME = "persuasion.txt"
SPLITS = ("calibration", "evaluation")


def load_bundled_model(dtype: torch.dtype = torch.float32) -> TinyDecoder:
    """Load the bundled pretrained :class:`TinyDecoder` (weights are stored in float16).

    Args:
        dtype: Dtype to cast the parameters to.

    Returns:
        The model, in eval mode, on the CPU.
    """
    config = TinyDecoderConfig.from_dict(json.loads((DATA_DIR / CONFIG_NAME).read_text()))
    model = TinyDecoder(config)
    model.load_state_dict(load_file(DATA_DIR / CHECKPOINT_NAME), strict=True)
    return model.to(dtype).eval()


def load_tokenizer() -> ByteTokenizer:
    """Return the tokenizer the bundled model was trained with.

    Returns:
        A :class:`ByteTokenizer`.
    """
    return ByteTokenizer()


def split_text(text: str, fraction: float = 0.9) -> tuple[str, str]:
    """Split ``text`` into a head of about ``fraction`` of its characters and the tail.

    The cut is placed just after the last newline before the target position, so
    ``head + tail == text``.

    Args:
        text: Text to split.
        fraction: Target share of the head, in ``(0, 1)``.

    Returns:
        ``(head, tail)``.
    """
    target = int(len(text) * fraction)
    newline = text.rfind("\n", 0, target)
    cut = newline + 1 if newline >= 0 else target
    return text[:cut], text[cut:]


def bundled_text(split: str) -> str:
    """Return part of the bundled text (Jane Austen's *Persuasion*, public domain).

    Args:
        split: ``"calibration"`` for the first 90% (by characters, cut at a newline), or
            ``"evaluation"`` for the remaining 10%, which the bundled model never trained on.

    Returns:
        The requested text.

    Raises:
        ValueError: If ``split`` is not one of the allowed values.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
    head, tail = split_text((DATA_DIR / TEXT_NAME).read_text(encoding="utf-8"))
    return head if split == "calibration" else tail


def token_windows(
    text: str, tokenizer: ByteTokenizer, seq_len: int, num_windows: int | None = None
) -> torch.Tensor:
    """Cut the tokenized ``text`` into consecutive, non-overlapping windows.

    Args:
        text: Text to tokenize.
        tokenizer: Tokenizer with an ``encode`` method.
        seq_len: Tokens per window.
        num_windows: Number of windows, taken from the start of the text; ``None`` takes as
            many as fit.

    Returns:
        LongTensor of shape ``[num_windows, seq_len]``.

    Raises:
        ValueError: If ``seq_len`` or ``num_windows`` is not positive, or the text is too short.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    ids = tokenizer.encode(text)
    available = len(ids) // seq_len
    if num_windows is None:
        num_windows = available
    if num_windows <= 0:
        raise ValueError(f"num_windows must be positive, got {num_windows}")
    if num_windows > available:
        raise ValueError(
            f"Text has {len(ids)} tokens, enough for {available} windows of {seq_len} tokens, "
            f"but {num_windows} were requested"
        )
    return torch.tensor(ids[: num_windows * seq_len], dtype=torch.long).view(num_windows, seq_len)
