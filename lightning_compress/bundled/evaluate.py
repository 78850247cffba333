"""Held-out perplexity of a causal language model."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.text import Perplexity


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Compute next-token perplexity of ``model`` over token windows.

    Inside each window, the logits at position ``t`` are scored against the token at ``t + 1``;
    windows are independent, so the first token of each window is never predicted.

    Args:
        model: Module mapping ``input_ids [B, L]`` to logits ``[B, L, vocab]``.
        windows: LongTensor of shape ``[N, L]`` with ``L >= 2``.
        batch_size: Windows per forward pass.

    Returns:
        The perplexity (``exp`` of the mean per-token cross-entropy, in nats).
    """
    device = next(model.parameters()).device
    metric = Perplexity().to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(batch[:, :-1]).float()
                metric.update(logits, batch[:, 1:])
    finally:
        model.train(was_training)
    return float(metric.compute())
