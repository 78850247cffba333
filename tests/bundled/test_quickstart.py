"""The quickstart compresses the bundled model and reports honest numbers."""

from __future__ import annotations

import math

from lightning_compress.bundled.quickstart import QuickstartRow, format_table, run_quickstart
from lightning_compress.cli import main


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
