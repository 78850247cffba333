"""The quickstart compresses the bundled model and reports honest numbers."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_compress.cli import main
from lightning_compress.lightning.quickstart import QuickstartRow, format_table, run_quickstart

CONFIGS = Path(__file__).parents[2] / "configs" / "recipes"


def test_quickstart_rows_are_measured():
    rows = run_quickstart(num_windows=2)
    assert [row.name for row in rows] == [
        "FP32 (bundled model)",
        "W8A16 RTN",
        "W4A16 RTN",
        "W4A16_ASYM RTN",
    ]
    base = rows[0].perplexity
    assert 1.5 < base < 8  # a trained byte-level model, far from uniform (256)
    w8, w4, w4_asym = rows[1:]
    assert abs(w8.perplexity / base - 1) < 0.01
    assert w8.weight_error < w4_asym.weight_error < w4.weight_error
    assert all(math.isfinite(row.perplexity) and row.perplexity < 2 * base for row in rows)


def test_recipe_files_from_the_command_line(capsys, tmp_path):
    recipe = tmp_path / "w8.yaml"
    recipe.write_text("q_modifiers:\n  QuantizationModifier: {scheme: W8A16, ignore: [lm_head]}\n")
    main(["quickstart", "--windows", "1", "--recipe", str(recipe)])
    out = capsys.readouterr().out
    assert "| w8 |" in out and "FP32 (bundled model)" in out


def test_table_shows_change_against_the_baseline():
    table = format_table([QuickstartRow("a", 4.0, 0, None), QuickstartRow("b", 5.0, 1.5, 0.25)])
    assert "| b | 5.000 | +25.00% | 0.2500 | 1.50 |" in table


def test_calibrated_recipes_run_in_the_quickstart():
    recipes = {
        name: CONFIGS / f"{name}.yaml" for name in ("gptq_w4a16_g64", "w4a16_rtn", "sparsegpt_50")
    }
    rows = run_quickstart(recipes, num_windows=1, num_calibration_samples=2)
    by_name = {row.name: row for row in rows}
    assert all(math.isfinite(row.perplexity) for row in rows)
    assert by_name["gptq_w4a16_g64"].weight_error > 0
    # SparseGPT zeroes half of each layer's weights: the relative error is well above rounding's
    assert by_name["sparsegpt_50"].weight_error > 2 * by_name["w4a16_rtn"].weight_error
