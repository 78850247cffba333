"""Load a causal language model and its tokenizer: a local checkpoint, or the bundled model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.bundled import load_bundled_model, load_tokenizer
from lightning_compress.core.checkpoint_files import read_config

__all__ = ["DTYPES", "default_seq_length", "load_model", "load_pretrained", "torch_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
LONGEST_SEQUENCE = 2048
UNKNOWN_CONTEXT = 256


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype named ``name``.

    Args:
        name: one of :data:`DTYPES`, or None.

    Returns:
        The dtype; None for None (keep the checkpoint's).

    Raises:
        ValueError: for another name.
    """
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def load_pretrained(
    path: str | Path | None,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    keep_quantization: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local checkpoint directory.

    A plain checkpoint is read with transformers' ``AutoModelForCausalLM``; one with a
    ``quantization_config`` (a compressed-tensors checkpoint) with ``load_compressed``.

    Args:
        path: a transformers checkpoint directory (``config.json`` and weights); None: the
            bundled tiny decoder with its byte tokenizer.
        dtype: ``float32``, ``bfloat16`` or ``float16``; None keeps the checkpoint's dtype
            (the bundled model: float32).
        tokenizer: the tokenizer's directory; None: ``path``.
        keep_quantization: for a compressed checkpoint, keep its layers quantized (True) or
            load the dequantized dense model (False, the start for a new recipe).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: if ``path`` is no directory with a ``config.json``.
        ValueError: for an unknown ``dtype``, or a checkpoint without a loadable tokenizer.
        ImportError: without the ``hf`` extra (transformers, compressed-tensors).
    """
    if path is None:
        return load_bundled_model(torch_dtype(dtype) or torch.float32), load_tokenizer()
    model = load_model(path, dtype, keep_quantization)
    from transformers import AutoTokenizer

    source = path if tokenizer is None else tokenizer
    try:
        loaded = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"tokenizer: no tokenizer could be loaded from {str(source)!r} ({error}); save the "
            f"tokenizer beside the model or name its directory"
        ) from error
    return model.eval(), loaded


def load_model(
    path: str | Path, dtype: str | None = None, keep_quantization: bool = True
) -> nn.Module:
    """Load a causal LM (without its tokenizer) from a local checkpoint directory.

    Args:
        path: a transformers checkpoint directory (``config.json`` and weights); one with a
            ``quantization_config`` is read with ``load_compressed``.
        dtype: ``float32``, ``bfloat16`` or ``float16``; None keeps the checkpoint's dtype.
        keep_quantization: for a compressed checkpoint, keep its layers quantized (True) or
            load the dequantized dense model (False).

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: if ``path`` is no directory with a ``config.json``.
        ValueError: for an unknown ``dtype``.
        ImportError: without the ``hf`` extra (transformers, compressed-tensors).
    """
    chosen = torch_dtype(dtype)
    config = read_config(path)
    if "quantization_config" in config:
        from lightning_compress.export import load_compressed

        model = load_compressed(path, keep_quantization=keep_quantization)
        return (model if chosen is None else model.to(chosen)).eval()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **{_dtype_keyword(): chosen or "auto"})
    return model.eval()


def default_seq_length(model: nn.Module) -> int:
    """The default tokens per sample or window: the model's context, at most 2048.

    Args:
        model: a transformers model (``config.max_position_embeddings``) or the bundled one
            (``config.max_seq_len``).

    Returns:
        Tokens per window; 256 where the model does not say its context.
    """
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_seq_len"):
        positions = getattr(config, name, None)
        if isinstance(positions, int) and positions > 1:
            return min(positions, LONGEST_SEQUENCE)
    return UNKNOWN_CONTEXT


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, else ``torch_dtype``.

    Older versions pass an unknown ``dtype`` on to the config and load float32.
    """
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
