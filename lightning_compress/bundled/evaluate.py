"""Held-out perplexity of a causal language model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torchmetrics.text import Perplexity

__all__ = ["causal_lm_logits", "perplexity"]

IGNORE_INDEX = -100


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, whether it returns a tensor or a Hugging Face output.

    Args:
        model: the language model.
        input_ids: token ids ``[batch, seq]``.

    Returns:
        Logits ``[batch, seq, vocab]``.
    """
    output = model(input_ids)
    return output if isinstance(output, torch.Tensor) else output.logits


def perplexity(
    model: nn.Module,
    windows: torch.Tensor | Sequence[dict[str, torch.Tensor]],
    batch_size: int = 8,
) -> float:
    """Compute next-token perplexity of ``model`` over token windows.

    Inside each window, the logits at position ``t`` are scored against the token at ``t + 1``;
    windows are independent, so the first token of each window is never predicted. Samples of
    different lengths are padded at the end, where a causal model's earlier logits do not
    see the padding, and the padded positions (and those an ``attention_mask`` marks 0) are not
    scored.

    Args:
        model: Module mapping ``input_ids [B, L]`` to logits ``[B, L, vocab]`` (a tensor or a
            Hugging Face output with ``logits``).
        windows: LongTensor of shape ``[N, L]`` with ``L >= 2``, or samples
            ``{"input_ids": [L], "attention_mask"?: [L]}`` (as ``calibration_samples`` returns).
        batch_size: Windows per forward pass.

    Returns:
        The perplexity (``exp`` of the mean per-token cross-entropy, in nats).

    Raises:
        ValueError: if no window has two tokens to score.
    """
    device = next(model.parameters()).device
    metric = Perplexity(ignore_index=IGNORE_INDEX).to(device)
    was_training = model.training
    model.eval()
    scored = 0
    try:
        with torch.no_grad():
            for inputs, targets in _batches(windows, batch_size):
                logits = causal_lm_logits(model, inputs.to(device)).float()
                targets = targets.to(device)
                metric.update(logits, targets)
                scored += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if scored == 0:
        raise ValueError("perplexity: no window has two tokens to score; give longer text")
    return float(metric.compute())


def _batches(
    windows: torch.Tensor | Sequence[dict[str, torch.Tensor]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids [B, L - 1], targets [B, L - 1])`` per batch, targets padded with -100."""
    if isinstance(windows, torch.Tensor):
        for batch in windows.split(batch_size):
            yield batch[:, :-1], batch[:, 1:]
        return
    for start in range(0, len(windows), batch_size):
        samples = windows[start : start + batch_size]
        length = max(len(sample["input_ids"]) for sample in samples)
        inputs = torch.zeros(len(samples), length, dtype=torch.long)
        targets = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            ids = sample["input_ids"]
            inputs[row, : len(ids)] = ids
            mask = sample.get("attention_mask")
            if mask is not None:
                ids = ids.masked_fill(mask == 0, IGNORE_INDEX)
            targets[row, : len(ids)] = ids
        yield inputs[:, :-1], targets[:, 1:]
