"""Scoring shared by both sides of the SmolLM2 benchmark: torch only, so llm-compressor's
environment imports it too (``smollm2_reference.py``)."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
from torch import nn


def token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods, ``[N, L - 1]``, of each window in ``ids``."""
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window, ``[N]`` (float64).

    The perplexity is ``exp`` of their mean (all windows have the same length).
    """
    model.eval()
    return torch.cat(
        [token_nll(model, batch).double().mean(dim=1) for batch in windows.split(batch_size)]
    )


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def linear_sparsity(model: nn.Module) -> float:
    """The fraction of exact zeros in the weights of the ``nn.Linear`` layers of the blocks
    (``lm_head`` and the tied embedding excluded)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def score(model: nn.Module, evaluation: torch.Tensor, measured: dict[str, Any]) -> dict[str, Any]:
    """The result of one run: ``measured`` plus perplexity, sparsity and peak memory.

    Args:
        model: the compressed (or FP) model.
        evaluation: the evaluation windows ``[N, 512]``.
        measured: what the run measured itself (run, side, compress_s, rss_loaded_mib,
            rss_compressed_mib).

    Returns:
        The result, ready for ``json.dumps``.
    """
    begin = time.perf_counter()
    nll = window_nll(model, evaluation)
    return {
        **measured,
        "rss_final_mib": peak_rss_mib(),
        "perplexity": nll.mean().exp().item(),
        "mean_window_perplexity": nll.exp().mean().item(),
        "sparsity": linear_sparsity(model),
        "window_nll": nll.tolist(),
        "eval_s": time.perf_counter() - begin,
        "threads": torch.get_num_threads(),
    }
