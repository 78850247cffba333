"""The quickstart: compress the bundled model with recipes and compare perplexities."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lightning_compress.bundled.evaluate import perplexity
from lightning_compress.bundled.loading import (
    bundled_text,
    load_bundled_model,
    load_tokenizer,
    token_windows,
)
from lightning_compress.core import CompressionSession
from lightning_compress.modifiers import QuantizationModifier

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
        weight_error: mean relative weight error over the quantized layers (None for FP).
    """

    name: str
    perplexity: float
    seconds: float
    weight_error: float | None


def run_quickstart(
    recipes: dict[str, Any] | None = None, num_windows: int = 16, seq_len: int = 256
) -> list[QuickstartRow]:
    """Compress a fresh copy of the bundled model with each recipe and measure it.

    Args:
        recipes: label → recipe (path, YAML text, dict or modifiers); the defaults when None.
        num_windows: evaluation windows of held-out text.
        seq_len: tokens per window.

    Returns:
        The FP baseline first, then one row per recipe.
    """
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    windows = token_windows(bundled_text("evaluation"), tokenizer, seq_len, num_windows)
    rows = [
        QuickstartRow("FP32 (bundled model)", perplexity(load_bundled_model(), windows), 0, None)
    ]
    for name, recipe in (recipes or DEFAULT_RECIPES).items():
        model = load_bundled_model()
        begin = time.perf_counter()
        session = CompressionSession()
        session.initialize(recipe=recipe, model=model)
        session.finalize()
        seconds = time.perf_counter() - begin
        errors = [
            value
            for modifier in session.lifecycle.recipe.modifiers
            for value in getattr(modifier, "layer_errors", {}).values()
        ]
        error = sum(errors) / len(errors) if errors else None
        rows.append(QuickstartRow(name, perplexity(model, windows), seconds, error))
    return rows


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
