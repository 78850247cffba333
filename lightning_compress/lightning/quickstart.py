"""The quickstart: compress the bundled model with recipes and compare perplexities."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.bundled.evaluate import perplexity
from lightning_compress.bundled.loading import (
    bundled_text,
    load_bundled_model,
    load_tokenizer,
    token_windows,
)
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.summary import CompressionSummary

__all__ = ["DEFAULT_RECIPES", "QuickstartRow", "format_table", "run_quickstart"]

DEFAULT_RECIPES = {
    f"{scheme} RTN": QuantizationModifier(scheme=scheme, ignore=["lm_head"])
    for scheme in ("W8A16", "W4A16", "W4A16_ASYM")
}


@dataclass
class QuickstartRow:
    """One line of the quickstart's table.

    Args:
        name: the recipe's label.
        perplexity: held-out perplexity after compression.
        seconds: time spent compressing.
        weight_error: mean relative weight error over the layers the recipe changed (None
            for FP).
    """

    name: str
    perplexity: float
    seconds: float
    weight_error: float | None


def run_quickstart(
    recipes: dict[str, Any] | None = None,
    num_windows: int = 16,
    seq_len: int = 256,
    num_calibration_samples: int = 32,
) -> list[QuickstartRow]:
    """Compress a fresh copy of the bundled model with each recipe and measure it.

    Each recipe runs through ``oneshot``: calibrated recipes (GPTQ, SparseGPT, AWQ, ...) on
    windows of the bundled calibration text, data-free ones (weight-only RTN) without reading
    it.

    Args:
        recipes: label → recipe (path, YAML text, dict or modifiers); the defaults when None.
        num_windows: evaluation windows of held-out text.
        seq_len: tokens per window.
        num_calibration_samples: calibration windows of ``seq_len`` tokens.

    Returns:
        The FP baseline first, then one row per recipe.
    """
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    windows = token_windows(bundled_text("evaluation"), tokenizer, seq_len, num_windows)
    calibration = token_windows(
        bundled_text("calibration"), tokenizer, seq_len, num_calibration_samples
    )
    rows = [
        QuickstartRow("FP32 (bundled model)", perplexity(load_bundled_model(), windows), 0, None)
    ]
    for name, recipe in (recipes or DEFAULT_RECIPES).items():
        model = load_bundled_model()
        original = _linear_weights(model)
        begin = time.perf_counter()
        oneshot(  # a summary given: the run does not log it, the table reports the recipe
            model,
            recipe,
            calibration,
            num_calibration_samples=None,
            max_seq_length=seq_len,
            summary=CompressionSummary(),
        )
        seconds = time.perf_counter() - begin
        error = _mean_weight_error(original, _linear_weights(model))
        rows.append(QuickstartRow(name, perplexity(model, windows), seconds, error))
    return rows


def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def _mean_weight_error(
    original: dict[str, torch.Tensor], compressed: dict[str, torch.Tensor]
) -> float | None:
    """Mean of ``||W - W'|| / ||W||`` over the layers the recipe changed; None if none."""
    errors = [
        float((weight - compressed[name]).norm() / weight.norm().clamp_min(1e-12))
        for name, weight in original.items()
        if not torch.equal(weight, compressed[name])
    ]
    return sum(errors) / len(errors) if errors else None


def format_table(rows: list[QuickstartRow]) -> str:
    """The rows as a Markdown table with the change against the first row.

    Args:
        rows: the quickstart's rows, baseline first.

    Returns:
        The table.
    """
    base = rows[0].perplexity
    lines = [
        "| model | perplexity | vs FP | mean rel. weight error | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        error = "-" if row.weight_error is None else f"{row.weight_error:.4f}"
        change = f"{100 * (row.perplexity / base - 1):+.2f}%"
        lines.append(
            f"| {row.name} | {row.perplexity:.3f} | {change} | {error} | {row.seconds:.2f} |"
        )
    return "\n".join(lines)
